"""core/files.staged_folder: a folder is written beside its target and replaces it only when complete."""

import pytest

from DiffusionSegLib.core.files import staged_folder


def test_a_complete_folder_replaces_the_old_one_and_a_failed_one_leaves_it(tmp_path):
    out = tmp_path / "data"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with staged_folder(out) as staging:
        assert staging.parent == tmp_path and staging != out and not any(staging.iterdir())
        (staging / "new.txt").write_text("new")
        assert (out / "old.txt").exists()  # readers still see the old folder while writing
    assert sorted(p.name for p in out.iterdir()) == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]

    with pytest.raises(RuntimeError):
        with staged_folder(out) as staging:
            (staging / "half.txt").write_text("half")
            raise RuntimeError("interrupted")
    assert sorted(p.name for p in out.iterdir()) == ["new.txt"]  # the complete folder is kept
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]  # no staging left behind
