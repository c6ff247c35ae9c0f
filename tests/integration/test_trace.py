"""-T/--trace: enabled events are written to file=, others are not."""

from tests.helpers import run_cli


def test_trace_to_file(daemon_factory, tmp_path):
    log = tmp_path / "trace.log"
    d = daemon_factory("trio", ["-T", f"enable=monitor_qmp_*,file={log}",
                                "--trace", "bdrv_open", "--blockdev", "null-co,node-name=n0"])
    d.qmp().cmd_raw("query-version")
    text = log.read_text()
    assert "monitor_qmp_cmd_in_band" in text and "cmd=query-version" in text
    assert "monitor_qmp_respond" in text
    # patterns add up across -T options; one output file for all
    assert "bdrv_open node_name=n0 driver=null-co" in text
    assert "qmp_event" not in text  # not enabled


def test_trace_help_lists_events():
    r = run_cli("trio", ["-T", "help"])
    assert r.returncode == 0
    assert "monitor_qmp_cmd_in_band" in r.stdout.split()


def test_trace_bad_option():
    r = run_cli("trio", ["-T", "enable=x,bogus=1"])
    assert r.returncode == 1
    assert r.stderr == "qsd-trio: --trace enable=x,bogus=1: Invalid parameter 'bogus'\n"
