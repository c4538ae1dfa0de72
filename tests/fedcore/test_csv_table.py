"""CSV tables read by column name, and labels checked against the task when data is loaded."""

import numpy as np
import pytest

from fedcore import (
    ConfigError,
    TaskSpec,
    canonical_json,
    load_local_data,
    read_csv_table,
    sha256_hex,
)


def write(path, text):
    path.write_text(text)
    return path


def test_columns_by_name_and_string_labels(tmp_path):
    path = write(tmp_path / "h.csv", "age,diagnosis,size\n50,malignant,1.5\n40,benign,2\n")
    table = read_csv_table(path, label="diagnosis")
    assert table.features == ("age", "size")
    assert table.classes == ("benign", "malignant")
    assert table.x.tolist() == [[50.0, 1.5], [40.0, 2.0]] and table.y.tolist() == [1, 0]
    # Another file with the columns in another order reads the same way.
    other = write(tmp_path / "d.csv", "size,extra,diagnosis,age\n3,x,benign,60\n")
    again = read_csv_table(other, label="diagnosis", features=table.features, classes=table.classes)
    assert again.x.tolist() == [[60.0, 3.0]] and again.y.tolist() == [0]


def test_whole_number_labels_are_classes_zero_to_max(tmp_path):
    path = write(tmp_path / "h.csv", "a,y\n1,0\n2,2.0\n3,1\n")
    table = read_csv_table(path, label="y")
    assert table.classes == ("0", "1", "2") and table.y.tolist() == [0, 2, 1]


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("a,y\n1,0\n,1\n", r"h.csv: row 3, column 'a': missing value"),
        ("a,y\n1,0\nNA,1\n", r"h.csv: row 3, column 'a': missing value"),
        ("a,y\n1,0\n2,1\nabc,1\n", r"h.csv: row 4, column 'a': 'abc' is not a number"),
        ("a,y\n1,0\ninf,1\n", r"h.csv: row 3, column 'a': 'inf' is not finite"),
        ("a,y\n1,0\n2,\n", r"h.csv: row 3, column 'y': missing label"),
        ("a,y\n1,0\n2,1,3\n", r"h.csv: row 3: 3 values for 2 columns"),
        ("a,b\n1,0\n", r"h.csv: row 1: no label column 'y' \(columns: a, b\)"),
        ("a,y\n1,0\n2,0\n", r"h.csv: column 'y': only one class"),
        ("", r"h.csv: empty file"),
    ],
)
def test_bad_tables_are_refused_with_file_row_and_column(tmp_path, body, message):
    path = write(tmp_path / "h.csv", body)
    with pytest.raises(ConfigError, match=message):
        read_csv_table(path, label="y")


def test_unknown_label_is_refused_with_its_row(tmp_path):
    path = write(tmp_path / "d.csv", "a,y\n1,benign\n2,unknown\n")
    with pytest.raises(ConfigError, match=r"row 3, column 'y': label 'unknown' is not one of"):
        read_csv_table(path, label="y", classes=("benign", "malignant"))
    with pytest.raises(ConfigError, match=r"row 1: no column 'b', which the task reads"):
        read_csv_table(path, label="y", features=("a", "b"), classes=("benign", "malignant"))


def test_label_outside_the_task_is_refused_at_load(tmp_path):
    np.savez(tmp_path / "d.npz", x=np.ones((3, 2)), y=np.array([0, 1, 2]))
    assert load_local_data(tmp_path / "d.npz")[1].tolist() == [0, 1, 2]
    with pytest.raises(ConfigError, match=r"d.npz: y\[2\]: label 2 is outside the task's 2"):
        load_local_data(tmp_path / "d.npz", n_classes=2)
    write(tmp_path / "d.csv", "a,b,label\n1,2,0\n3,4,2\n")
    with pytest.raises(ConfigError, match=r"d.csv: row 3: label 2 is outside the task's 2"):
        load_local_data(tmp_path / "d.csv", n_classes=2)
    write(tmp_path / "neg.csv", "1,2,-1\n")
    with pytest.raises(ConfigError, match=r"neg.csv: row 1: label -1 is outside"):
        load_local_data(tmp_path / "neg.csv", n_classes=2)


def test_task_columns_are_checked_and_hashed_only_when_present():
    base = {"id": "t", "model": {"kind": "logreg", "n_features": 2, "n_classes": 2}}
    plain = TaskSpec.model_validate(base)
    columns = {"label": "y", "features": ["a", "b"], "classes": ["no", "yes"]}
    with_columns = TaskSpec.model_validate({**base, "columns": columns})
    assert plain.spec_hash() != with_columns.spec_hash()
    # A task without columns keeps the hash it had before columns existed.
    before = {k: v for k, v in plain.model_dump(mode="json").items() if k != "columns"}
    del before["asynchronous"], before["dp"], before["secagg"], before["quorum"]
    del before["positive_class"]
    assert plain.spec_hash() == sha256_hex(canonical_json(before))
    # an explicit quorum is hashed; an unset one (a majority of the fleet) is left out
    assert TaskSpec.model_validate({**base, "quorum": 1}).spec_hash() != plain.spec_hash()
    with pytest.raises(ValueError, match="names 1 of 2 features"):
        TaskSpec.model_validate({**base, "columns": {**columns, "features": ["a"]}})
    with pytest.raises(ValueError, match="names 3 of 2 classes"):
        TaskSpec.model_validate({**base, "columns": {**columns, "classes": ["a", "b", "c"]}})
