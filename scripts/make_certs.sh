#!/usr/bin/env bash
# Credentials for trying out a secure deployment (TLS + SuperNode authentication).
#
#   scripts/make_certs.sh OUT_DIR [NODE_NAME ...]
#
# Writes, with openssl and ssh-keygen:
#   OUT_DIR/ca.crt, ca.key          a local certificate authority (10 years)
#   OUT_DIR/server.pem, server.key  the SuperLink's TLS certificate, signed by the
#                                   CA, valid for localhost and 127.0.0.1 plus the
#                                   names in $SERVER_SANS (e.g. "superlink
#                                   link.example.org 10.0.0.5")
#   OUT_DIR/<node>, <node>.pub      one ECDSA P-384 key pair per SuperNode (OpenSSH
#                                   format, what `flower-supernode
#                                   --auth-supernode-private-key` and `flwr supernode
#                                   register` read)
#
# SuperNodes and the flwr CLI only need ca.crt (to verify the SuperLink) and, for a
# SuperNode, its own private key. Existing files are kept: rerunning the script only
# adds what is missing. For real deployments use your organisation's PKI.
set -euo pipefail

if [[ $# -lt 1 ]]; then
    echo "usage: $0 OUT_DIR [NODE_NAME ...]" >&2
    exit 2
fi
out=$1
shift
mkdir -p "$out"
cd "$out"
umask 077

if [[ ! -f ca.key || ! -f ca.crt ]]; then
    openssl ecparam -name prime256v1 -genkey -noout -out ca.key
    openssl req -x509 -new -key ca.key -sha256 -days 3650 -out ca.crt \
        -subj "/CN=mh-pfedhn local CA" \
        -addext "basicConstraints=critical,CA:TRUE" \
        -addext "keyUsage=critical,keyCertSign,cRLSign"
fi

if [[ ! -f server.key || ! -f server.pem ]]; then
    sans="DNS:localhost,IP:127.0.0.1,IP:::1"
    for name in ${SERVER_SANS:-}; do
        if [[ $name =~ ^[0-9.]+$ || $name == *:* ]]; then
            sans+=",IP:$name"
        else
            sans+=",DNS:$name"
        fi
    done
    openssl ecparam -name prime256v1 -genkey -noout -out server.key
    openssl req -new -key server.key -out server.csr -subj "/CN=localhost"
    printf '%s\n' \
        "basicConstraints=CA:FALSE" \
        "keyUsage=critical,digitalSignature,keyEncipherment" \
        "extendedKeyUsage=serverAuth" \
        "subjectAltName=$sans" >server.ext
    openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial \
        -out server.pem -days 825 -sha256 -extfile server.ext
    rm -f server.csr server.ext ca.srl
fi

for node in "$@"; do
    if [[ ! -f $node ]]; then
        ssh-keygen -q -t ecdsa -b 384 -N "" -C "$node" -f "$node"
    fi
done
# Certificates and public keys are public; private keys stay 0600.
chmod 644 ca.crt server.pem ./*.pub 2>/dev/null || true
echo "credentials in $(pwd)"
