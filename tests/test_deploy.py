"""Deployment material without a deployment: credentials, Docker files, the guide.

The deployment itself (real SuperLink, SuperNodes and ``flwr run``) is
``make deploy-test`` (scripts/deploy_test.py, several minutes), run by CI after
``make test``. These checks take seconds: the credentials ``make_certs.sh`` writes
work for TLS and are keys Flower accepts; the Compose files parse, reference what
exists and use only the options (and choices) Flower's programs document in their
``--help``; the Dockerfile installs like the Makefile; every Flower command of
docs/guides/deploying.md resolves and is the one the deploy test runs; and
``flwr build`` packs the app code without docs/. No Docker engine is needed (nor
available here).
"""

from __future__ import annotations

import functools
import os
import re
import shlex
import socket
import ssl
import subprocess
import sys
import threading
import tomllib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import flwr
import pytest
import yaml
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import (
    load_ssh_private_key,
    load_ssh_public_key,
)

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
GUIDE = ROOT / "docs" / "guides" / "deploying.md"
DEPLOY_TEST = ROOT / "scripts" / "deploy_test.py"
MAKE_CERTS = ROOT / "scripts" / "make_certs.sh"
FLWR_VERSION = flwr.__version__


# -- Flower's command lines, as their --help documents them ---------------------------
# Only Flower's public interface is used: each program's ``--help`` (run in a
# subprocess; nothing else runs) lists its options and, for ``flwr``, its commands.
# The command lines below are checked against those lists by our own small parsers.
BIN = Path(sys.executable).parent
ANSI = re.compile(r"\x1b\[[0-9;]*m")
#: Value types in click/typer's help tables: an option showing one takes a value.
CLICK_TYPES = {"TEXT", "INTEGER", "FLOAT", "PATH", "FILE", "DIRECTORY", "BOOLEAN"}


@functools.cache
def help_text(*command: str) -> str:
    env = os.environ | {"TERMINAL_WIDTH": "200", "COLUMNS": "200", "NO_COLOR": "1"}
    proc = subprocess.run(
        [str(BIN / command[0]), *command[1:], "--help"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, (command, proc.stdout + proc.stderr)
    return ANSI.sub("", proc.stdout)


@pytest.fixture(scope="module", autouse=True)
def _prefetch_help():
    """Run the ``--help`` calls this module needs side by side (each starts Flower)."""
    commands = [
        ("flower-superlink",),
        ("flower-supernode",),
        ("flower-superexec",),
        ("flwr",),
        *(("flwr", c) for c in ("run", "supernode", "list", "log")),
        *(("flwr", "supernode", c) for c in ("register", "list", "unregister")),
    ]
    with ThreadPoolExecutor(max_workers=4) as pool:
        list(pool.map(lambda command: help_text(*command), commands))


@functools.cache
def argparse_options(program: str) -> dict[str, set[str] | bool]:
    """``--flag`` -> False (a switch), True (takes a value) or its set of choices,
    from the options section of an argparse program's ``--help``."""
    options: dict[str, set[str] | bool] = {}
    for line in help_text(program).splitlines():
        m = re.match(r"^  (?:-\w, )?(--[\w-]+)(?: (\S+))?(?:  |$)", line)
        if m:
            flag, metavar = m.groups()
            choices = re.fullmatch(r"\{(.*)\}", metavar or "")
            options[flag] = set(choices[1].split(",")) if choices else bool(metavar)
    assert "--help" in options, program
    return options


def dest(flag: str) -> str:
    """argparse's attribute name for ``--flag``."""
    return flag[2:].replace("-", "_")


def parse_argparse(program: str, args: list[str]) -> SimpleNamespace:
    """Parse ``args`` like the program would (each option known, values where the
    option takes one and in its choices, no positionals); missing options are None
    and switches False, as argparse gives them."""
    options = argparse_options(program)
    parsed = {dest(f): (None if v else False) for f, v in options.items()}
    words = list(args)
    while words:
        flag, eq, value = words.pop(0).partition("=")
        assert flag in options, f"{program}: unknown option {flag} in {args}"
        kind = options[flag]
        if kind is False:
            assert not eq, f"{program}: {flag} takes no value"
            parsed[dest(flag)] = True
            continue
        if not eq:
            assert words, f"{program}: {flag} needs a value"
            value = words.pop(0)
        assert kind is True or value in kind, f"{program}: {flag}={value} not in {kind}"
        parsed[dest(flag)] = value
    return SimpleNamespace(**parsed)


def parse_superlink(args: list[str]) -> SimpleNamespace:
    return parse_argparse("flower-superlink", args)


def parse_supernode(args: list[str]) -> SimpleNamespace:
    return parse_argparse("flower-supernode", args)


def parse_superexec(args: list[str]) -> SimpleNamespace:
    return parse_argparse("flower-superexec", args)


@dataclass
class FlwrCommand:
    """One level of ``flwr``'s command tree, from its ``--help`` panels."""

    commands: dict[str, str]  # name or alias -> name
    options: dict[str, bool]  # option -> takes a value
    arguments: list[bool]  # positional arguments in order: required?


@functools.cache
def flwr_command(*path: str) -> FlwrCommand:
    commands: dict[str, str] = {}
    options: dict[str, bool] = {}
    arguments: list[bool] = []
    panel = ""
    for line in help_text("flwr", *path).splitlines():
        if line.startswith("╭─"):
            panel = line.strip("╭─ ").split(" ")[0]
            continue
        cells = line.strip("│ ").split()
        if panel == "Arguments" and cells:  # "* name TYPE [required]" or "name ..."
            required = cells[0] == "*"
            if re.fullmatch(r"[a-z_]+", cells[int(required)]):
                arguments.append(required)
            continue
        if not line.startswith("│ ") or line.startswith("│  "):
            continue  # not a row, or a row's continuation
        if panel == "Commands":
            commands[cells[0]] = cells[0]
            for alias in re.findall(r"\(alias: ([\w-]+)\)", line):
                commands[alias] = cells[0]
        elif panel == "Options":
            names = [c for c in cells if c.startswith("-")][:3]
            rest = cells[len(names)] if len(names) < len(cells) else ""
            value = rest in CLICK_TYPES or bool(re.fullmatch(r"\[\S*\|\S*\]", rest))
            options |= {name: value for name in names}
    assert options, f"flwr {' '.join(path)}: no options in its help"
    return FlwrCommand(commands, options, arguments)


def parse_flwr(args: list[str]) -> tuple[str, ...]:
    """Resolve ``flwr`` subcommands and check their options and arguments (nothing
    runs); return the resolved command path."""
    path: list[str] = []
    words = list(args)
    command = flwr_command()
    while words and words[0] in command.commands:
        path.append(command.commands[words.pop(0)])
        command = flwr_command(*path)
    assert path and not command.commands, f"flwr {args}: no command"
    positionals = []
    while words:
        word = words.pop(0)
        if not word.startswith("-"):
            positionals.append(word)
            continue
        flag, eq, _ = word.partition("=")
        assert flag in command.options, f"flwr {args}: unknown option {flag}"
        if command.options[flag] and not eq:
            assert words, f"flwr {args}: {flag} needs a value"
            words.pop(0)
    assert sum(command.arguments) <= len(positionals) <= len(command.arguments), (
        f"flwr {args}: {len(positionals)} arguments for {command.arguments}"
    )
    return tuple(path)


NODE_CONFIG_PAIR = re.compile(r"""(\S+?)=('[^']*'|"[^"]*"|\S+)""")


def parse_node_config(text: str) -> dict:
    """A ``--node-config`` value: space-separated ``key=value`` pairs, each value a
    TOML value (the format Flower documents for it)."""
    assert re.fullmatch(rf"\s*(?:{NODE_CONFIG_PAIR.pattern}\s*)*", text), text
    pairs = NODE_CONFIG_PAIR.findall(text)
    return tomllib.loads("\n".join(f"{k} = {v}" for k, v in pairs))


def test_our_parsers_reject_what_flower_rejects():
    with pytest.raises(AssertionError, match="unknown option --no-such-flag"):
        parse_superlink(["--insecure", "--no-such-flag"])
    with pytest.raises(AssertionError, match="not in"):
        parse_superlink(["--isolation=thread"])
    with pytest.raises(AssertionError, match="takes no value"):
        parse_supernode(["--insecure=yes"])
    args = parse_supernode(["--superlink", "127.0.0.1:9092", "--insecure"])
    assert args.superlink == "127.0.0.1:9092" and args.insecure
    assert args.root_certificates is None and args.isolation is None
    assert parse_flwr(["ls", "deploy"]) == ("list",)
    assert parse_flwr(["supernode", "ls", "deploy"]) == ("supernode", "list")
    assert parse_flwr(["run", ".", "deploy", "-c", "x=1", "--stream"]) == ("run",)
    with pytest.raises(AssertionError, match="no command"):
        parse_flwr(["supernode"])
    with pytest.raises(AssertionError, match="unknown option --bogus"):
        parse_flwr(["run", ".", "--bogus"])
    with pytest.raises(AssertionError, match="arguments"):
        parse_flwr(["log"])  # the run id is required
    with pytest.raises(AssertionError, match="arguments"):
        parse_flwr(["run", ".", "deploy", "extra"])
    config = 'client-name="site-a" partition-id=0 data-dir="/srv/a b"'
    assert parse_node_config(config) == {
        "client-name": "site-a",
        "partition-id": 0,
        "data-dir": "/srv/a b",
    }


# -- credentials ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("certs")
    env = {"PATH": "/usr/bin:/bin", "SERVER_SANS": "superlink 10.1.2.3"}
    subprocess.run(
        ["bash", str(MAKE_CERTS), str(out), "site-a", "site-b"],
        check=True,
        capture_output=True,
        env=env,
    )
    return out


def test_make_certs_writes_a_verifiable_server_certificate_with_sans(certs):
    verify = subprocess.run(
        ["openssl", "verify", "-CAfile", certs / "ca.crt", certs / "server.pem"],
        capture_output=True,
        text=True,
    )
    assert verify.returncode == 0, verify.stderr
    text = subprocess.run(
        ["openssl", "x509", "-in", certs / "server.pem", "-noout", "-ext",
         "subjectAltName"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    for san in ["DNS:localhost", "IP Address:127.0.0.1", "DNS:superlink"]:
        assert san in text
    assert "IP Address:10.1.2.3" in text
    for secret in ["ca.key", "server.key", "site-a", "site-b"]:
        assert (certs / secret).stat().st_mode & 0o077 == 0, secret


@pytest.mark.parametrize("host", ["localhost", "127.0.0.1"])
def test_the_certificate_serves_tls_to_a_client_trusting_only_the_ca(certs, host):
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(certs / "server.pem", certs / "server.key")
    client = ssl.create_default_context(cafile=str(certs / "ca.crt"))
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)

        def serve() -> None:
            conn, _ = listener.accept()
            with server.wrap_socket(conn, server_side=True) as tls:
                tls.sendall(b"ok")

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        port = listener.getsockname()[1]
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
            with client.wrap_socket(raw, server_hostname=host) as tls:
                assert tls.recv(2) == b"ok"
        thread.join(timeout=10)


def test_node_keys_are_what_flower_accepts_and_reruns_keep_them(certs):
    """Flower's SuperNode authentication takes OpenSSH EC keys on a NIST curve
    (``flwr supernode register`` loads the public one); make_certs writes P-384."""
    for site in ["site-a", "site-b"]:
        key = load_ssh_private_key((certs / site).read_bytes(), None)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        assert key.curve.name == "secp384r1"
        public = load_ssh_public_key((certs / f"{site}.pub").read_bytes())
        assert isinstance(public, ec.EllipticCurvePublicKey)
        assert public.public_numbers() == key.public_key().public_numbers()
    before = {p.name: p.read_bytes() for p in certs.iterdir()}
    subprocess.run(
        ["bash", str(MAKE_CERTS), str(certs), "site-a", "site-c"],
        check=True,
        capture_output=True,
    )
    after = {p.name: p.read_bytes() for p in certs.iterdir()}
    assert {k: after[k] for k in before} == before  # nothing overwritten
    assert set(after) - set(before) == {"site-c", "site-c.pub"}


# -- Docker --------------------------------------------------------------------------
def load_compose(*names: str) -> dict:
    """The services of the given Compose files, later files overriding keys."""
    services: dict = {}
    for name in names:
        data = yaml.safe_load((DOCKER / name).read_text())
        for service, spec in data["services"].items():
            services.setdefault(service, {}).update(spec)
    return services


def app_image(spec: dict) -> bool:
    return "build" in spec


def parse_service(name: str, spec: dict):
    command = spec["command"]
    if app_image(spec):
        return parse_superexec(command)
    image = spec["image"]
    if image.startswith("flwr/superlink:"):
        return parse_superlink(command)
    if image.startswith("flwr/supernode:"):
        return parse_supernode(command)
    raise AssertionError(f"{name}: unexpected image {image}")


@pytest.mark.parametrize(
    "files", [("compose.yml",), ("compose.yml", "compose.tls.yml")], ids=["base", "tls"]
)
def test_compose_services_exist_and_their_commands_parse(files):
    services = load_compose(*files)
    base = load_compose("compose.yml")
    assert set(services) == set(base)  # the override adds no service
    version = f"${{FLWR_VERSION:-{FLWR_VERSION}}}"
    for name, spec in services.items():
        for dependency in spec.get("depends_on", []):
            assert dependency in services, f"{name} depends on {dependency}"
        if app_image(spec):
            context = (DOCKER / spec["build"]["context"]).resolve()
            assert context == ROOT
            assert (context / spec["build"]["dockerfile"]).is_file()
            assert spec["build"]["args"]["FLWR_VERSION"] == version
        else:
            assert spec["image"].endswith(f":{version}"), spec["image"]
        parse_service(name, spec)  # exits (fails) on an unknown flag or value
    for spec in services.values():  # executors reach existing APIs
        if app_image(spec):
            args = parse_superexec(spec["command"])
            host, port = args.runtime_api_address.split(":")
            assert host in services and port in " ".join(services[host]["command"])


def test_compose_sites_have_distinct_identities_and_existing_models():
    from common.models import available_models

    sites = []
    for spec in load_compose("compose.yml").values():
        if spec.get("image", "").startswith("flwr/supernode:"):
            config = parse_node_config(parse_supernode(spec["command"]).node_config)
            assert config["model"] in available_models()
            assert config["state-dir"] and config["data-dir"]
            sites.append((config["client-name"], config["partition-id"]))
    assert len(sites) >= 2
    assert len({n for n, _ in sites}) == len({p for _, p in sites}) == len(sites)


def test_the_tls_variant_is_secure_and_mounts_what_make_certs_writes(certs):
    services = load_compose("compose.yml", "compose.tls.yml")
    overridden = yaml.safe_load((DOCKER / "compose.tls.yml").read_text())["services"]
    for name in overridden:
        spec = services[name]
        args = parse_service(name, spec)
        assert not args.insecure, name
        mounts = [
            re.match(r"(.+?):(/app/[^:]+)", v).groups()
            for v in spec["volumes"]
            if "certificates" in v
        ]
        targets = {target: Path(source).name for source, target in mounts}
        for source_name in targets.values():
            assert (certs / source_name).is_file(), source_name  # make_certs names
        for flag in ["ssl_ca_certfile", "ssl_certfile", "ssl_keyfile"]:
            if getattr(args, flag, None) and spec["image"].startswith("flwr/superlink"):
                assert f"/app/{getattr(args, flag)}" in targets
        if spec.get("image", "").startswith("flwr/superlink:"):
            assert args.enable_supernode_auth
        if spec.get("image", "").startswith("flwr/supernode:"):
            assert f"/app/{args.auth_supernode_private_key}" in targets
            assert f"/app/{args.root_certificates}" in targets
        if app_image(spec):
            assert f"/app/{args.root_certificates}" in targets


def test_dockerfile_builds_on_flowers_superexec_and_installs_like_the_makefile():
    text = (DOCKER / "Dockerfile").read_text()
    assert f"ARG FLWR_VERSION={FLWR_VERSION}\n" in text
    assert "FROM flwr/superexec:${FLWR_VERSION}" in text
    assert 'ENTRYPOINT ["flower-superexec"]' in text
    joined = text.replace("\\\n", " ")
    run = " ".join(re.findall(r"^RUN (.*)$", joined, re.M))
    installs = [cmd for cmd in run.split("&&") if "pip install" in cmd]
    packages = [cmd for cmd in installs if "--upgrade pip" not in cmd]
    assert len(packages) == 2
    assert all("-c constraints.txt" in cmd for cmd in packages)
    assert re.search(r"\btorch\b", packages[0]) and packages[1].split()[-1] == "."
    makefile = (ROOT / "Makefile").read_text()
    assert "-c constraints.txt torch" in makefile  # the same order there
    copied = re.findall(r"^COPY --chown=app:app (.+) \S+$", text, re.M)
    sources = {s for line in copied for s in line.split()}
    for source in sources:
        assert (ROOT / source).exists(), source
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    top_level = {p.split(".")[0] for p in pyproject["tool"]["setuptools"]["packages"]}
    assert top_level <= sources
    ignore = (DOCKER / "Dockerfile.dockerignore").read_text().splitlines()
    for source in sources:
        assert f"!{source}" in ignore or f"!{source}/" in ignore, source


# -- the guide -----------------------------------------------------------------------
def guide_commands() -> list[list[str]]:
    """The shell commands of the guide's bash blocks, continuation lines joined."""
    blocks = re.findall(r"```bash\n(.*?)```", GUIDE.read_text(), re.S)
    commands = []
    for block in blocks:
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #")[0].strip()
            if line:
                words = shlex.split(line)
                while words and "=" in words[0] and not words[0].startswith("-"):
                    words = words[1:]  # VAR=value prefixes
                commands.append(words)
    return commands


def placeholders(words: list[str]) -> list[str]:
    return [re.sub(r"^<[a-z-]+>$", "123", w) for w in words]


def test_every_flower_command_of_the_guide_parses_and_the_deploy_test_runs_it():
    script = DEPLOY_TEST.read_text()
    seen = set()
    for words in guide_commands():
        program, args = words[0], placeholders(words[1:])
        if program == "flower-superlink":
            parse_superlink(args)
        elif program == "flower-supernode":
            parse_supernode(args)
        elif program == "flwr":
            parse_flwr(args)
        else:
            continue
        seen.add(program)
        # The deploy test runs the same program with the same flags/subcommands.
        if program == "flwr":
            assert f'"{args[0]}"' in script, words
            if len(args) > 1 and not args[1].startswith("-"):
                assert f'"{args[1]}"' in script or args[0] in {"run", "log"}, words
        else:
            assert f'"{program}"' in script, words
        for flag in [a.split("=")[0] for a in args if a.startswith("--")]:
            assert f'"{flag}"' in script, (flag, words)
    assert seen == {"flower-superlink", "flower-supernode", "flwr"}
    assert "make_certs.sh" in script


def test_the_guide_links_only_existing_files():
    for path in re.findall(r"`((?:docker|scripts|docs|client_app)/[\w./-]+)`",
                           GUIDE.read_text()):  # fmt: skip
        if "certs" not in path:
            assert (ROOT / path).exists(), path


def test_the_app_bundle_ships_the_app_code_and_nothing_else(tmp_path):
    """pyproject's fab-include: what `flwr run` sends every SuperNode.

    Every module of the three app packages and pyproject.toml; no tests,
    benchmarks, tools, scripts, docs (the committed records) or README.
    """
    import zipfile

    out = tmp_path / "fab"
    out.mkdir()
    build = subprocess.run(
        [str(BIN / "flwr"), "build", "--app", str(ROOT)],
        cwd=out,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert build.returncode == 0, build.stdout + build.stderr
    (fab,) = out.glob("*.fab")
    names = set(zipfile.ZipFile(fab).namelist())
    code = {
        path.relative_to(ROOT).as_posix()
        for package in ("common", "server_app", "client_app")
        for path in (ROOT / package).rglob("*.py")
        if "__pycache__" not in path.parts
    }
    assert code and not code - names, sorted(code - names)
    assert "pyproject.toml" in names
    shipped = {name.split("/")[0] for name in names if not name.startswith(".info/")}
    assert shipped == {"pyproject.toml", "common", "server_app", "client_app"}
    assert all(name.endswith(".py") for name in names if "/" in name and
               not name.startswith(".info/"))  # fmt: skip
