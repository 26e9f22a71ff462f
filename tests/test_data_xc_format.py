import re

import pytest
import torch

from mhe_scale.data.xc_format import read_label_lists, read_predictions, read_xc_format, write_xc_format
from mhe_scale.labels import pad_label_lists


def _write(tmp_path, text, name="data.txt"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_reads_a_hand_written_file(tmp_path):
    path = _write(tmp_path, "4 6 5\n"
                            "3,0 5:0.5 1:2\n"   # unsorted features: sorted in the CSR
                            " 2:1\n"            # no labels: the line starts with a space
                            "4\n"               # labels, no features
                            "0:-1.25\n")        # no leading space but the first token is a feature
    data = read_xc_format(path)
    assert (data.num_points, data.num_features, data.num_labels) == (4, 6, 5)
    assert data.labels.tolist() == [[3, 0], [-1, -1], [4, -1], [-1, -1]]
    assert data.features.layout == torch.sparse_csr
    assert data.features.crow_indices().tolist() == [0, 2, 3, 3, 4]
    assert data.features.col_indices().tolist() == [1, 5, 2, 0]
    want = torch.zeros(4, 6)
    want[0, 5], want[0, 1], want[1, 2], want[3, 0] = 0.5, 2.0, 1.0, -1.25
    assert torch.equal(data.features.to_dense(), want)
    labels_only = read_xc_format(path, features=False)
    assert labels_only.features is None and torch.equal(labels_only.labels, data.labels)


def test_round_trip(tmp_path):
    gen = torch.Generator().manual_seed(0)
    n, f, c = 50, 30, 20
    dense = torch.randn(n, f, generator=gen) * (torch.rand(n, f, generator=gen) < 0.2)
    dense[7] = 0  # a point without features
    lists = [torch.randperm(c, generator=gen)[: int(torch.randint(0, 4, (1,), generator=gen))].tolist() for _ in range(n)]
    lists[7] = []  # ... and without labels: its line is a lone space
    lists[-1] = []
    path = tmp_path / "rt.txt"
    write_xc_format(path, dense, lists, num_labels=c)
    assert path.read_text().splitlines()[8] == " "
    data = read_xc_format(path)
    assert (data.num_points, data.num_features, data.num_labels) == (n, f, c)
    assert torch.equal(data.features.to_dense(), dense)  # float32 values survive exactly (9 digits)
    width = data.labels.shape[1]
    assert torch.equal(data.labels, pad_label_lists(lists, min_width=width))
    # and again from a sparse CSR input, with a wider header
    write_xc_format(path, data.features, data.labels, num_features=40, num_labels=25)
    again = read_xc_format(path)
    assert (again.num_features, again.num_labels) == (40, 25)
    assert torch.equal(again.features.to_dense()[:, :f], dense) and torch.equal(again.labels, data.labels)


def test_real_bibtex_and_delicious(shared_data):
    bibtex = read_xc_format(shared_data / "mulan-bibtex" / "xc_format" / "train.txt")
    assert (bibtex.num_points, bibtex.num_features, bibtex.num_labels) == (4880, 1836, 159)
    assert bibtex.features.shape == (4880, 1836) and bibtex.labels.shape[0] == 4880
    assert int(bibtex.labels.max()) < 159 and bool((bibtex.labels[:, 0] >= 0).all())  # every point labelled
    assert bool((bibtex.features.values() == 1).all())  # binary bag of words
    test = read_xc_format(shared_data / "mulan-bibtex" / "xc_format" / "test.txt", features=False)
    assert (test.num_points, test.num_labels) == (2515, 159)
    delicious = read_xc_format(shared_data / "mulan-delicious" / "xc_format" / "train.txt")
    assert (delicious.num_points, delicious.num_features, delicious.num_labels) == (12920, 500, 983)
    first_lines = (shared_data / "mulan-delicious" / "xc_format" / "train.txt").read_text().splitlines()[1:]
    assert int((delicious.labels[:, 0] < 0).sum()) == sum(line.startswith(" ") for line in first_lines)


BAD_FILES = [
    ("4880 1836\n", 1, "bad header"),
    ("3 x 2\n0 0:1\n1 0:1\n0 0:1\n", 1, "bad header"),
    ("3 4 2\n0 0:1\n1 0:1\n", None, "header says N=3 points but 2 lines"),
    ("1 4 2\n0 0:1\n1 0:1\n", None, "header says N=1 points but 2 lines"),
    ("2 4 2\n0 0:1\n1,2 0:1\n", 3, "label id 2 is out of range"),
    ("2 4 2\n0 0:1\n1 4:1\n", 3, "feature id 4 is out of range"),
    ("2 4 2\n0,x 0:1\n1 0:1\n", 2, "unparsable label id 'x'"),
    ("2 4 2\n0 0:1\n1 0:abc\n", 3, "unparsable feature token '0:abc'"),
    ("2 4 2\n0 0:1 2\n1 0:1\n", 2, "unparsable feature token '2'"),
    ("2 4 2\n0 0:1:2 3\n1 0:1\n", 2, "unparsable feature token '0:1:2'"),
    ("2 4 2\n0 0:1\n1 3: 1:1\n", 3, "unparsable feature token '3:'"),
    ("2 4 2\n0 0:1 0:2\n1 0:1\n", 2, "feature id 0 appears twice"),
    ("2 4 2\n0 0:1\n1 2:0.5 3:nan\n", 3, "feature 3 has value nan, not a finite"),
    ("2 4 2\n0 1:-inf\n1 0:1\n", 2, "feature 1 has value -inf, not a finite"),
    ("2 4 2\n0 0:1\n1 2:1e39\n", 3, "feature 2 has value inf, not a finite"),  # float32 overflow
]


@pytest.mark.parametrize("text,line,message", BAD_FILES)
def test_malformed_files_name_file_and_line(tmp_path, text, line, message):
    path = _write(tmp_path, text, "broken.txt")
    with pytest.raises(ValueError) as err:
        read_xc_format(path)
    msg = str(err.value)
    assert message in msg
    assert str(path) in msg
    if line is not None:
        assert f"broken.txt:{line}:" in msg


def test_binary_file_names_path_and_line(tmp_path):
    path = tmp_path / "train.txt"
    path.write_bytes(b"2 4 2\n0 0:1\n\x1f\x8b\x08\x00\xff binary\n")  # e.g. a gzip stream
    for read in (read_xc_format, read_label_lists, read_predictions):
        with pytest.raises(ValueError, match=re.escape(f"{path}:3: byte b'\\x8b' at column 2 is not UTF-8")):
            read(path)


def test_dataset_refuses_non_finite_features_naming_the_point():
    from mhe_scale.data.xmc_dataset import XMCDataset

    dense = torch.tensor([[0.0, 1.0, 0.0], [2.0, 0.0, float("inf")]])
    with pytest.raises(ValueError, match=r"features hold inf at point 1 \(line 3 of an XC file\), feature 2"):
        XMCDataset(dense.to_sparse_csr(), torch.tensor([[0], [1]]))
    assert len(XMCDataset(dense.nan_to_num(posinf=3.0).to_sparse_csr(), torch.tensor([[0], [1]]))) == 2


def test_byte_order_mark_is_ignored(tmp_path):
    path = tmp_path / "bom.txt"
    path.write_bytes("2 3 2\n0 0:1\n1 2:1\n".encode("utf-8-sig"))
    assert read_xc_format(path).labels.tolist() == [[0], [1]]
    path.write_bytes("3,1\n2\n".encode("utf-8-sig"))
    assert read_label_lists(path).tolist() == [[3, 1], [2, -1]]


def test_blank_lines_at_the_end_are_tolerated(tmp_path):
    data = read_xc_format(_write(tmp_path, "2 3 2\n0 0:1\n1 2:1\n\n\n"))
    assert data.labels.tolist() == [[0], [1]]


def test_plain_label_lists(tmp_path):
    path = _write(tmp_path, "3,1\n\n 0 , 2 ,5\n")
    assert read_label_lists(path).tolist() == [[3, 1, -1], [-1, -1, -1], [0, 2, 5]]
    with pytest.raises(ValueError, match=re.escape(f"{path}:3: label id 5 is out of range")):
        read_label_lists(path, num_labels=5)
    bad = _write(tmp_path, "1\n2\n3 4\n", "bad.txt")
    with pytest.raises(ValueError, match=re.escape(f"{bad}:3: unparsable label id '3 4'")):
        read_label_lists(bad)


def test_read_predictions(tmp_path):
    ids, scores = read_predictions(_write(tmp_path, "4:0.9 1:0.5 7:0.5\n\n2:-1\n"))
    assert ids.tolist() == [[4, 1, 7], [-1, -1, -1], [2, -1, -1]]
    assert scores[0].tolist() == pytest.approx([0.9, 0.5, 0.5]) and scores[1, 0] == float("-inf")
    ids, scores = read_predictions(_write(tmp_path, "4 1\n3\n", "bare.txt"))
    assert ids.tolist() == [[4, 1], [3, -1]] and scores is None
    for text, line, message in [("4:0.9 1\n", 1, "unparsable prediction '1'"),
                                ("4:0.9\n1:0.2 3:0.7\n", 2, "scores increase along the line"),
                                ("4:0.9\n-3:0.2\n", 2, "predicted label id -3 is out of range"),
                                ("4:0.9\n3:0.5 1:nan\n", 2, "a score is nan")]:
        path = _write(tmp_path, text, "pred.txt")
        with pytest.raises(ValueError, match=re.escape(f"{path}:{line}: {message}")):
            read_predictions(path)
