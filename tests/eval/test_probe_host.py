"""The host-transfer probe runs on the CPU and reports every situation x way."""

import json

from eval import probe_host


def test_probe_reports_every_cell(tmp_path):
  out = tmp_path / "probe.json"
  result = probe_host.main(["--compute-size", "128", "--compute-steps", "1", "--copies", "2",
                            "--copy-mib", "0.1", "--repeats", "1", "--out", str(out)])
  assert json.loads(out.read_text())["cells"] == result["cells"]
  assert set(result["cells"]) == {f"{s} | {w}" for s in probe_host.SITUATIONS for w in probe_host.WAYS}
  for cell in result["cells"].values():
    assert 0 < cell["returns_ms"] <= cell["ready_ms"]
  assert result["small_read_ms"] > 0
