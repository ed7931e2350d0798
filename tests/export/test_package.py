"""zip_export: an export folder as one download, entry names safe whatever the folder and the stem hold."""
import zipfile

from export.package import safe_name, zip_export


def test_zip_holds_the_folders_own_files_under_safe_names(tmp_path):
    folder = tmp_path / "export"
    folder.mkdir()
    files = {"model.onnx": b"\x08\x07graph", "config.json": b"{}", "tokenizer.json": b'{"v": 1}'}
    for name, data in files.items():
        (folder / name).write_bytes(data)
    (folder / "a\\..\\b").write_bytes(b"odd")               # a backslash name: a path on Windows
    (tmp_path / "secret").write_bytes(b"server file")
    (folder / "link").symlink_to(tmp_path / "secret")      # a link must not carry a server file out
    (folder / "sub").mkdir()
    (folder / "sub" / "inner").write_bytes(b"x")

    archive = zip_export(folder, tmp_path / "zips", "../../org/My Model-onnx-int4")
    assert archive.parent == tmp_path / "zips" and archive.name == "org_My_Model-onnx-int4.zip"
    with zipfile.ZipFile(archive) as z:
        assert z.testzip() is None
        names = z.namelist()
        assert all(n.startswith("org_My_Model-onnx-int4/") and n.count("/") == 1 for n in names)
        assert not any(".." in n or "\\" in n for n in names)
        got = {n.split("/", 1)[1]: z.read(n) for n in names}
    assert got == {**files, "a___b": b"odd"}               # no link, no subfolder
    assert not list((tmp_path / "zips").glob("*.part"))


def test_a_zip_is_made_once(tmp_path):
    (tmp_path / "f").mkdir()
    (tmp_path / "f" / "model.onnx").write_bytes(b"one")
    first = zip_export(tmp_path / "f", tmp_path / "z")
    (tmp_path / "f" / "model.onnx").write_bytes(b"two")
    assert zip_export(tmp_path / "f", tmp_path / "z") == first == tmp_path / "z" / "f.zip"
    with zipfile.ZipFile(first) as z:
        assert z.read("f/model.onnx") == b"one"


def test_safe_name():
    assert safe_name("..") == "export" and safe_name(".hidden") == "hidden" and safe_name("a/b\\c") == "a_b_c"
    assert safe_name("x..y") == "x_y" and safe_name("C:\\..\\win") == "C___win"
    assert safe_name("SmolLM2-135M.Q4_1") == "SmolLM2-135M.Q4_1"
