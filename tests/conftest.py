import pytest

from tests.helpers import Daemon


@pytest.fixture
def daemon_factory(tmp_path):
    """daemon_factory(kind, args) -> started Daemon, stopped at teardown."""
    started: list[Daemon] = []

    def factory(kind: str = "trio", args: list[str] | None = None, **kw) -> Daemon:
        d = Daemon(kind, tmp_path, args, **kw)
        started.append(d)
        return d.start()

    yield factory
    for d in started:
        d.stop(check=False)
    for d in started:  # every daemon stopped first, then any failure
        d.check_stderr()


@pytest.fixture
def qsd(daemon_factory):
    """A started qsd-trio with a QMP monitor; returns the Daemon."""
    return daemon_factory("trio")
