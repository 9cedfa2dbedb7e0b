"""The ClientApp package (``client_app.app:app``)."""

from common.openmp import prefer_passive_wait

# Before anything imports torch (see common.openmp).
prefer_passive_wait()
