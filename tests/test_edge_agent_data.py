"""edge_agent.data: growing CSV files, CSV directories, callables, in-memory arrays."""

import logging

import numpy as np
import pytest
from sklearn.datasets import load_digits

from edge_agent.data import ArraySource, CallableSource, CSVDirectory, CSVFile
from protocol.tabular import DataError, write_csv

X, Y = load_digits(return_X_y=True)


def append_rows(path, rows):
    with path.open("a") as fh:
        fh.writelines(line + "\n" for line in rows)


def test_csv_file_reads_appended_rows_within_a_window(tmp_path):
    path = tmp_path / "a.csv"
    write_csv(path, X[:5], Y[:5])
    source = CSVFile(path, window=3)
    assert source.poll() == 5 and source.poll() == 0
    assert len(source) == 3
    np.testing.assert_array_equal(source.data()[1], Y[2:5])  # the window keeps the newest
    append_rows(path, [",".join(map(str, X[5])) + f",{Y[5]}", "1,2"])  # the second line is half-written
    assert source.poll() == 1  # only the complete line
    np.testing.assert_array_equal(source.data()[0][-1], X[5])


def test_bad_appended_rows_are_skipped_and_the_good_ones_kept(tmp_path, caplog):
    path = tmp_path / "a.csv"
    write_csv(path, X[:3, :2], Y[:3])  # header line 1, rows on lines 2-4
    source = CSVFile(path)
    assert source.poll() == 3
    append_rows(path, ["1.0,2.0,1", "oops,2.0,1", "3.0,4.0,0", "", "5.0,inf,1"])  # lines 5-9
    with caplog.at_level(logging.WARNING, logger="edge_agent.data"):
        assert source.poll() == 2
    assert "skipped 2 unreadable row(s) at line 6, 9" in caplog.text
    np.testing.assert_array_equal(source.data()[1], [*Y[:3], 1, 0])


def test_the_first_read_is_strict(tmp_path):
    path = tmp_path / "a.csv"
    path.write_text("f0,label\n1,0\nx,1\n")
    with pytest.raises(DataError, match=r"line 3, column 'f0': 'x' is not a number"):
        CSVFile(path).poll()
    path.write_text("f0,f1\n")  # the header alone already tells the label column is missing
    with pytest.raises(DataError, match="no column 'label'"):
        CSVFile(path).poll()
    with pytest.raises(DataError, match="no such file"):
        CSVFile(tmp_path / "missing.csv")


def test_header_only_file_waits_for_rows(tmp_path):
    path = tmp_path / "a.csv"
    path.write_text("f0,label\n")
    source = CSVFile(path)
    assert source.poll() == 0 and len(source) == 0
    append_rows(path, ["1.5,1"])
    assert source.poll() == 1


def test_rewritten_file_is_read_from_the_start(tmp_path):
    path = tmp_path / "a.csv"
    write_csv(path, X[:10], Y[:10])
    source = CSVFile(path)
    source.poll()
    write_csv(path, X[:2], Y[:2])
    assert source.poll() == 2


def test_csv_directory_picks_up_new_files(tmp_path):
    write_csv(tmp_path / "a.csv", X[:5], Y[:5])
    directory = CSVDirectory(tmp_path)
    assert directory.poll() == 5
    write_csv(tmp_path / "b.csv", X[5:8], Y[5:8])
    assert directory.poll() == 3 and len(directory) == 8
    with pytest.raises(DataError, match="no such directory"):
        CSVDirectory(tmp_path / "nope")


def test_callable_source(tmp_path):
    with pytest.raises(DataError, match="cannot import"):
        CallableSource("nonexistent_module_xyz:f")
    with pytest.raises(DataError, match="module:function"):
        CallableSource("nocolon")
    with pytest.raises(DataError, match="failed"):
        CallableSource("numpy:eye").poll()  # eye() needs an argument


def test_array_source_holds_its_rows_at_once():
    source = ArraySource(X[:7], Y[:7])
    assert len(source) == 7 and len(source.data()[1]) == 7
    assert source.poll() == 7 and source.poll() == 0
