import pytest

from mhe_scale.data.safe_paths import PathEscapeError, relative_under, resolve_under


def test_resolve_under_keeps_inside_paths(tmp_path):
    assert resolve_under(tmp_path, "a/b.jpg", "x") == tmp_path / "a" / "b.jpg"
    assert resolve_under(tmp_path, "a/../b.jpg", "x") == tmp_path / "b.jpg"


@pytest.mark.parametrize("bad", ["../../../etc/hostname", "a/../../x.jpg", "/etc/hostname", "~/x.jpg", ".."])
def test_resolve_under_refuses_escapes(tmp_path, bad):
    with pytest.raises(PathEscapeError, match=r"list.txt:3"):
        resolve_under(tmp_path / "root", bad, "list.txt:3")


def test_resolve_under_refuses_sibling_with_common_prefix(tmp_path):
    (tmp_path / "root").mkdir()
    with pytest.raises(PathEscapeError):
        resolve_under(tmp_path / "root", "../root2/x.jpg", "f")


def test_relative_under(tmp_path):
    assert relative_under(tmp_path, tmp_path / "img" / "a.jpg", "f") == "img/a.jpg"
    with pytest.raises(PathEscapeError, match="outside the image root"):
        relative_under(tmp_path / "img", tmp_path / "other" / "a.jpg", "f")
