"""tools/plot_heads.py reads the bench_heads table (skipped rows left out) and writes a PNG."""

import pytest

from conftest import load_tool

TABLE = """Some text.

| C | head | step (ms) | FC/head time | params + Adam state | FC/head state | peak memory |
|---:|---|---:|---:|---:|---:|---:|
| 10,000 | fc | 1298.7 | 1.0x | 58.7 MB | 1x | 236.4 MB |
| 10,000 | mhp [100, 100] | 320.0 | 4.1x | 1.2 MB | 50x | 86.1 MB |
| 2,059,906 | fc | skipped: ~23 GB needed | | | | |
| 2,059,906 | mhp [1557, 1323] | 752.0 | - | 16.9 MB | - | 142.1 MB |
| 2,059,906 | mhp3 [173, 147, 81] | 78.2 | - | 390.8 KB | - | 89.8 MB |

After the table.
"""


def test_parses_the_table_and_writes_a_png(tmp_path):
    tool = load_tool("plot_heads")
    series = tool.parse_heads_table(TABLE)
    assert series == {"fc": [(10000, 1298.7, 58.7 * 2**20)],
                      "mhp": [(10000, 320.0, 1.2 * 2**20), (2059906, 752.0, 16.9 * 2**20)],
                      "mhp3": [(2059906, 78.2, 390.8 * 2**10)]}
    (tmp_path / "t.md").write_text(TABLE)
    assert tool.main([str(tmp_path / "t.md"), "--out", str(tmp_path / "p.png")]) == 0
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="no 'C | head"):
        tool.parse_heads_table("no table here")
