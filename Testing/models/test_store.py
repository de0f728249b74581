"""Model management: install from a folder or zip, download (file:// and real HTTP), clear, and the CLI."""

from __future__ import annotations

import functools
import hashlib
import http.server
import json
import os
import shutil
import stat
import threading
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from helpers import REPO
from DiffusionSegLib.models import store as models
from DiffusionSegLib.cli.main import main
from DiffusionSegLib.core.errors import ModelLoadError
from DiffusionSegLib.models.card import CARD_NAME, WEIGHTS_NAME
from DiffusionSegLib.methods.registry import load_model
from DiffusionSegLib.models.store import clear_installed_models, list_models, resolve_model, user_models_dir


def install_model(*args, **kwargs):
    """install_model as the CLI and the Slicer panel call it: with the full load check."""
    return models.install_model(*args, load_check=load_model, **kwargs)


def download_model(*args, **kwargs):
    """download_model as the CLI and the Slicer panel call it: with the full load check."""
    return models.download_model(*args, load_check=load_model, **kwargs)

BUNDLED = REPO / "Resources" / "Models" / "ct_abdomen_organs_2d"
# The bundled model's card name is taken by the bundled folder (found first), so installs are renamed.
NAME = "liver_copy"


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch) -> Path:
    """A private DIFFUSIONSEG_HOME and no $DIFFUSIONSEG_MODELS, so nothing outside tmp is touched."""
    monkeypatch.setenv("DIFFUSIONSEG_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("DIFFUSIONSEG_MODELS", raising=False)
    return tmp_path / "home"


@pytest.fixture
def model_copy(tmp_path) -> Path:
    dest = tmp_path / "src" / "ct_abdomen_organs_2d"
    shutil.copytree(BUNDLED, dest)
    return dest


def zip_folder(folder: Path, archive: Path, top: str | None = None) -> Path:
    """Zip the files of ``folder`` at the root of ``archive``, or under ``top/``."""
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
        for f in sorted(folder.iterdir()):
            zf.write(f, f"{top}/{f.name}" if top else f.name)
    return archive


def installed_entries() -> list[str]:
    root = user_models_dir()
    return sorted(p.name for p in root.iterdir()) if root.exists() else []


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_install_from_folder_is_listed_and_loads(model_copy):
    path = install_model(model_copy, name=NAME)
    assert path == user_models_dir() / NAME
    assert sorted(p.name for p in path.iterdir()) == sorted(p.name for p in BUNDLED.iterdir())
    assert installed_entries() == [NAME], "temporary folders left behind"
    assert stat.S_IMODE(path.stat().st_mode) == 0o755
    origins = {p.name: o for o, p, _ in list_models()}
    assert origins[NAME] == "installed" and origins["ct_abdomen_organs_2d"] == "bundled"
    assert resolve_model(NAME) == path
    _net, card = load_model(path)
    assert card.name == "ct_abdomen_organs_2d"  # --name renames the folder, not the card


def test_install_uses_the_card_name_by_default(model_copy):
    card = json.loads((model_copy / CARD_NAME).read_text())
    card["name"] = "renamed_in_card"
    (model_copy / CARD_NAME).write_text(json.dumps(card))
    assert install_model(model_copy).name == "renamed_in_card"


def test_name_of_a_bundled_model_is_refused(model_copy):
    with pytest.raises(ModelLoadError, match="already exists at .*under another name"):
        install_model(model_copy)
    assert installed_entries() == []


@pytest.mark.parametrize("top", [None, "some_folder"])
def test_install_from_zip(model_copy, tmp_path, top):
    archive = zip_folder(model_copy, tmp_path / "m.zip", top)
    with zipfile.ZipFile(archive, "a") as zf:  # what macOS Finder adds: ignored
        zf.writestr("__MACOSX/._model.json", b"junk")
    path = install_model(archive, name=NAME)
    assert (path / WEIGHTS_NAME).read_bytes() == (BUNDLED / WEIGHTS_NAME).read_bytes()
    assert not (path / "__MACOSX").exists()
    assert installed_entries() == [NAME]


def _bad_zip(model_copy: Path, tmp_path: Path, why: str) -> Path:
    archive = zip_folder(model_copy, tmp_path / f"{why}.zip")
    with zipfile.ZipFile(archive, "a") as zf:
        if why == "dotdot":
            zf.writestr("../evil.txt", b"outside")
        elif why == "nested_dotdot":
            zf.writestr("sub/../../evil.txt", b"outside")
        elif why == "absolute":
            zf.writestr(zipfile.ZipInfo("/tmp/evil.txt"), b"outside")
        elif why == "backslash":
            zf.writestr("..\\evil.txt", b"outside")
        elif why == "symlink":
            info = zipfile.ZipInfo("link")
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            zf.writestr(info, "/etc/passwd")
    return archive


@pytest.mark.parametrize("why,message", [("dotdot", r"outside the archive"), ("nested_dotdot", r"outside the archive"),
                                         ("absolute", "absolute"), ("backslash", "non-portable"),
                                         ("symlink", "symbolic link")])
def test_unsafe_zip_entries_are_refused(model_copy, tmp_path, why, message):
    archive = _bad_zip(model_copy, tmp_path, why)
    with pytest.raises(ModelLoadError, match=message):
        install_model(archive, name=NAME)
    assert installed_entries() == []
    assert not (tmp_path / "evil.txt").exists() and not (user_models_dir().parent / "evil.txt").exists()


def test_oversized_zip_is_refused(model_copy, tmp_path, monkeypatch):
    archive = zip_folder(model_copy, tmp_path / "m.zip")
    monkeypatch.setattr(models, "MAX_UNPACKED_BYTES", 1 << 20)  # the real limit is 2 GiB: same code path
    with pytest.raises(ModelLoadError, match="limit"):
        install_model(archive, name=NAME)
    assert installed_entries() == []


def test_zip_without_a_model_or_with_two_folders_is_refused(model_copy, tmp_path):
    two = zip_folder(model_copy, tmp_path / "two.zip", "a")
    with zipfile.ZipFile(two, "a") as zf:
        zf.writestr("b/readme.txt", b"x")
    with pytest.raises(ModelLoadError, match="holds no model"):
        install_model(two, name=NAME)
    empty = tmp_path / "empty.zip"
    zipfile.ZipFile(empty, "w").close()
    with pytest.raises(ModelLoadError, match="holds no model"):
        install_model(empty, name=NAME)
    not_zip = tmp_path / "weights.zip"
    not_zip.write_bytes(b"PK not really")
    with pytest.raises(ModelLoadError, match="not a model folder or .zip"):
        install_model(not_zip, name=NAME)
    with pytest.raises(ModelLoadError, match="no such"):
        install_model(tmp_path / "missing", name=NAME)
    assert installed_entries() == []


def test_tampered_weights_are_refused_and_nothing_installed(model_copy, tmp_path):
    weights = model_copy / WEIGHTS_NAME
    blob = bytearray(weights.read_bytes())
    blob[-5] ^= 0xFF
    weights.write_bytes(bytes(blob))
    with pytest.raises(ModelLoadError, match="sha256"):
        install_model(model_copy, name=NAME)
    with pytest.raises(ModelLoadError, match="sha256"):
        install_model(zip_folder(model_copy, tmp_path / "t.zip"), name=NAME)
    assert installed_entries() == []


def test_bad_card_and_bad_names_are_refused(model_copy):
    for bad in ("../x", "a/b", "", ".hidden", "..", "a b"):
        with pytest.raises(ModelLoadError, match="invalid model name"):
            install_model(model_copy, name=bad)
    card = json.loads((model_copy / CARD_NAME).read_text())
    card["name"] = "../../escape"
    (model_copy / CARD_NAME).write_text(json.dumps(card))
    with pytest.raises(ModelLoadError, match="invalid model name"):
        install_model(model_copy)
    card["name"] = "ok"
    card["network"]["channels"] = [8, 16]  # weights no longer fit the architecture
    (model_copy / CARD_NAME).write_text(json.dumps(card))
    with pytest.raises(ModelLoadError, match="do not match"):
        install_model(model_copy)
    assert installed_entries() == []


def test_overwrite_semantics(model_copy, tmp_path):
    first = install_model(model_copy, name=NAME)
    (first / "marker.txt").write_text("old")
    with pytest.raises(ModelLoadError, match="already installed"):
        install_model(model_copy, name=NAME)
    assert (first / "marker.txt").exists(), "a refused install changed the existing model"
    # A failed replacement keeps the old model.
    broken = tmp_path / "broken"
    shutil.copytree(model_copy, broken)
    (broken / WEIGHTS_NAME).write_bytes(b"not safetensors")
    with pytest.raises(ModelLoadError, match="sha256"):
        install_model(broken, name=NAME, overwrite=True)
    assert (first / "marker.txt").exists()
    second = install_model(model_copy, name=NAME, overwrite=True)
    assert second == first and not (second / "marker.txt").exists()
    assert installed_entries() == [NAME]
    # Reinstalling a model over itself (source = destination) works too.
    assert install_model(second, name=NAME, overwrite=True) == second
    load_model(second)
    # Something that is not a model is never replaced.
    (user_models_dir() / "not_a_model").mkdir()
    with pytest.raises(ModelLoadError, match="not a model folder"):
        install_model(model_copy, name="not_a_model", overwrite=True)


class _Server:
    """http.server on 127.0.0.1 in a thread, recording the request methods it saw."""

    def __init__(self, folder: Path) -> None:
        seen: list[str] = []

        class Handler(http.server.SimpleHTTPRequestHandler):
            def log_message(self, *args) -> None:  # keep the test output clean
                pass

            def handle_one_request(self) -> None:
                super().handle_one_request()
                if self.command:
                    seen.append(self.command)

        self.seen = seen
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0),
                                                     functools.partial(Handler, directory=str(folder)))
        # A short poll interval: shutdown() waits for the next poll.
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(5)


@pytest.fixture
def served(model_copy, tmp_path) -> Iterator[tuple[_Server, Path]]:
    www = tmp_path / "www"
    www.mkdir()
    archive = zip_folder(model_copy, www / "model.zip", "ct_abdomen_organs_2d")
    server = _Server(www)
    try:
        yield server, archive
    finally:
        server.close()


def test_download_over_http(served):
    server, archive = served
    calls: list[tuple[int, int]] = []
    path = download_model(f"{server.url}/model.zip", sha256_file(archive).upper(), name=NAME,
                          progress=lambda done, total: calls.append((done, total)))
    assert path == user_models_dir() / NAME
    load_model(path)
    assert server.seen == ["GET"]
    size = archive.stat().st_size
    assert calls[0] == (0, size) and calls[-1] == (size, size)
    assert installed_entries() == [NAME], "the downloaded archive was left behind"


def test_download_from_file_url(model_copy, tmp_path):
    archive = zip_folder(model_copy, tmp_path / "model.zip")
    path = download_model(archive.as_uri(), sha256_file(archive), name=NAME)
    assert [o for o, p, _ in list_models() if p == path] == ["installed"]
    assert archive.exists(), "the source of a file:// download must not be moved"


def test_raising_from_progress_cancels_the_download(served):
    server, archive = served

    def cancel(done: int, total: int) -> None:
        if done:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        download_model(f"{server.url}/model.zip", sha256_file(archive), name=NAME, progress=cancel)
    assert installed_entries() == []


def test_download_checksum_mismatch_leaves_nothing(served):
    server, archive = served
    wrong = hashlib.sha256(b"something else").hexdigest()
    with pytest.raises(ModelLoadError, match="sha256 of the download .* expected"):
        download_model(f"{server.url}/model.zip", wrong, name=NAME)
    assert installed_entries() == []


def test_download_errors_are_clear(served, tmp_path):
    server, archive = served
    digest = sha256_file(archive)
    with pytest.raises(ModelLoadError, match="64 hexadecimal"):
        download_model(f"{server.url}/model.zip", "abc123")
    with pytest.raises(ModelLoadError, match="unsupported URL"):
        download_model("ftp://example.org/model.zip", digest)
    with pytest.raises(ModelLoadError, match="HTTP 404"):
        download_model(f"{server.url}/missing.zip", digest, name=NAME)
    with pytest.raises(ModelLoadError, match="download of .* failed"):
        download_model((tmp_path / "missing.zip").as_uri(), digest, name=NAME)
    assert installed_entries() == []
    # A correct checksum of something that is not a model archive: checked, then refused by install.
    page = tmp_path / "www" / "page.html"
    page.write_text("<html></html>")
    with pytest.raises(ModelLoadError, match="not a model folder or .zip"):
        download_model(f"{server.url}/page.html", sha256_file(page), name=NAME)
    assert installed_entries() == []


def test_clear_removes_only_installed_models(model_copy, tmp_path, monkeypatch):
    env_dir = tmp_path / "env_models"
    shutil.copytree(model_copy, env_dir / "env_model")
    monkeypatch.setenv("DIFFUSIONSEG_MODELS", str(env_dir))
    install_model(model_copy, name=NAME)
    install_model(model_copy, name="second")
    root = user_models_dir()
    (root / "user_notes").mkdir()  # not a model: kept
    (root / "user_notes" / "a.txt").write_text("x")
    (root / "readme.txt").write_text("x")
    old_leftover = root / f"{models.TEMP_PREFIX}install-crashed"
    old_leftover.mkdir()
    os.utime(old_leftover, (0, 0))
    fresh_leftover = root / f"{models.TEMP_PREFIX}install-running"  # may be an install in progress
    fresh_leftover.mkdir()
    shutil.copy(model_copy / CARD_NAME, fresh_leftover / CARD_NAME)  # never listed as a model
    link = root / "linked"
    link.symlink_to(env_dir / "env_model")
    assert clear_installed_models() == 3
    assert installed_entries() == sorted([fresh_leftover.name, "readme.txt", "user_notes"])
    assert (env_dir / "env_model" / WEIGHTS_NAME).is_file(), "the target of a link was removed"
    assert (BUNDLED / WEIGHTS_NAME).is_file()
    assert {o for o, _, _ in list_models()} == {"env", "bundled"}
    assert clear_installed_models() == 0


def test_clear_refuses_a_folder_that_is_also_an_env_folder(model_copy, monkeypatch):
    install_model(model_copy, name=NAME)
    monkeypatch.setenv("DIFFUSIONSEG_MODELS", str(user_models_dir()))
    with pytest.raises(ModelLoadError, match="not clearing"):
        clear_installed_models()
    assert installed_entries() == [NAME]


def test_clear_without_a_models_folder():
    assert clear_installed_models() == 0


def run_cli(*args: object) -> int:
    return main([str(a) for a in args])


def test_cli_install_list_clear(model_copy, tmp_path, capsys):
    assert run_cli("models", "install", model_copy, "--name", NAME) == 0
    assert f"installed model {NAME}" in capsys.readouterr().out
    assert run_cli("models") == 0
    out = capsys.readouterr().out
    assert f"{NAME} [installed]" in out and "ct_abdomen_organs_2d (default) [bundled]" in out and "ct_abdomen_organs_unisegdiff_2d [bundled]" in out
    assert run_cli("models", "--json") == 0
    listed = {m["name"]: m["origin"] for m in json.loads(capsys.readouterr().out)}
    assert listed[NAME] == "installed"
    # Errors: one line on stderr, exit 2.
    assert run_cli("models", "install", model_copy, "--name", NAME) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("diffusionseg: error:") and "already installed" in err and "\n" not in err
    assert run_cli("models", "install", model_copy, "--name", NAME, "--overwrite") == 0
    capsys.readouterr()
    archive = zip_folder(model_copy, tmp_path / "m.zip")
    assert run_cli("models", "download", archive.as_uri(), "--sha256", "0" * 64, "--name", "other", "-q") == 2
    err = capsys.readouterr().err.strip()
    assert "sha256" in err and "\n" not in err
    assert run_cli("models", "download", archive.as_uri(), "--sha256", sha256_file(archive), "--name", "other",
                   "-q") == 0
    capsys.readouterr()
    assert run_cli("models", "clear") == 0
    assert "removed 2 installed models" in capsys.readouterr().out
    assert installed_entries() == []
    assert run_cli("models") == 0
    assert "[installed]" not in capsys.readouterr().out
