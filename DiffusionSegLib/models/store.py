"""Where models live: bundled with the extension, installed by the user, or given by path.

Search order for a model name: folders in ``$DIFFUSIONSEG_MODELS`` (os.pathsep-separated), the
bundled ``Resources/Models`` of this repository/extension, then the user folder
``~/.cache/diffusionseg/models`` (``$DIFFUSIONSEG_HOME/models``). A path to a model folder is always
accepted as is.

``install_model``, ``download_model`` and ``clear_installed_models`` manage the user folder: a model is
checked completely (card, weights sha256, architecture) before it appears there, and never half-written.
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import re
import shutil
import stat
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

from DiffusionSegLib.core.errors import ModelLoadError
from DiffusionSegLib.core.files import sha256_of
from DiffusionSegLib.models.card import CARD_NAME, FORMAT_VERSION, SHA256_PATTERN, WEIGHTS_NAME, ModelCard, read_card

log = logging.getLogger("diffusionseg")

DEFAULT_MODEL = "ct_abdomen_organs_2d"
BUNDLED_DIR = Path(__file__).resolve().parents[2] / "Resources" / "Models"
# Prefix of every temporary file/folder this module creates in user_models_dir(); clear_installed_models
# removes leftovers with it (an install killed half-way), and list_models skips them.
TEMP_PREFIX = ".diffusionseg-"


def user_models_dir() -> Path:
    """Folder for models the user installs or downloads."""
    return Path(os.environ.get("DIFFUSIONSEG_HOME", Path.home() / ".cache" / "diffusionseg")) / "models"


def search_dirs() -> list[tuple[str, Path]]:
    """(origin, folder) pairs searched for models, in priority order."""
    extra = [("env", Path(p)) for p in os.environ.get("DIFFUSIONSEG_MODELS", "").split(os.pathsep) if p]
    return [*extra, ("bundled", BUNDLED_DIR), ("installed", user_models_dir())]


def list_models() -> list[tuple[str, Path, ModelCard]]:
    """Every readable model: (origin, folder, card). Unreadable folders are skipped."""
    found = []
    for origin, folder in search_dirs():
        if not folder.is_dir():
            continue
        for child in sorted(folder.iterdir()):
            # Skip install_model's temporary folders: they hold a card while an install is checked.
            if child.name.startswith(TEMP_PREFIX):
                continue
            if (child / CARD_NAME).is_file():
                try:
                    found.append((origin, child, read_card(child)))
                except ModelLoadError:
                    continue
    return found


def resolve_model(name_or_path: str | os.PathLike | None) -> Path:
    """A model folder from a path or a name (None = the bundled default)."""
    if name_or_path is None:
        name_or_path = DEFAULT_MODEL
    path = Path(name_or_path)
    if (path / CARD_NAME).is_file():
        return path
    for _origin, folder in search_dirs():
        if (folder / str(name_or_path) / CARD_NAME).is_file():
            return folder / str(name_or_path)
    if path.exists():
        raise ModelLoadError(f"not a DiffusionSeg model folder (no {CARD_NAME}): {path}")
    raise ModelLoadError(f"model '{name_or_path}' not found (see 'diffusionseg models')")


def verify_weights(model_dir: Path, card: ModelCard) -> Path:
    """The weights file of a model folder, after checking it exists and has the card's sha256.

    Raises ModelLoadError for a missing, modified or truncated file. Loading the weights into the
    network is the methods' job (``methods.registry.load_model``).
    """
    return _checked_file(Path(model_dir) / WEIGHTS_NAME, card.weights_sha256)


def verify_members(model_dir: Path, card: ModelCard) -> list[Path]:
    """The extra ensemble member files of a model folder (``card.members``), each checked like the
    weights (present, the card's sha256); [] for a single-network model. Raises ModelLoadError."""
    return [_checked_file(Path(model_dir) / name, digest) for name, digest in card.member_files()]


def verify_network(model_dir: Path, card: ModelCard, member: int) -> Path:
    """The weights file of network ``member`` alone (0 = ``model.safetensors``, K = ``card.members[K-1]``),
    checked like the weights; the other networks' files are not read. Raises ModelLoadError."""
    if member == 0:
        return verify_weights(model_dir, card)
    name, digest = card.member_files()[member - 1]
    return _checked_file(Path(model_dir) / name, digest)


def _checked_file(path: Path, expected_sha256: str) -> Path:
    """``path`` after checking it exists and has ``expected_sha256`` (ModelLoadError otherwise)."""
    if not path.is_file():
        raise ModelLoadError(f"model weights missing: {path}")
    actual = sha256_of(path)
    if actual != expected_sha256:
        raise ModelLoadError(
            f"sha256 of {path} is {actual[:12]}..., the model card says {expected_sha256[:12]}...: "
            "the weights were modified or truncated"
        )
    return path


# A check that a staged model really loads (``methods.registry.load_model``: the network the card
# describes accepts the weights). Passed in by the caller, because building networks is the layer
# above this one; without it an install checks the card and the weights' sha256 only.
LoadCheck = Callable[[Path], Any]


# --- Installing, downloading and clearing user models -----------------------------------------

# An archive or download larger than this once unpacked is refused: models are megabytes, and a
# "zip bomb" must not fill the user's disk before the checks run.
MAX_UNPACKED_BYTES = 2 << 30
MAX_ARCHIVE_ENTRIES = 10_000
DOWNLOAD_TIMEOUT_S = 30.0  # per socket operation (connect, each read), not for the whole transfer
# Temporary entries younger than this are left by clear_installed_models: they may belong to an
# install or download still running (e.g. a background thread in Slicer).
_TEMP_GRACE_S = 600.0
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,127}")
# Archive entries that desktop zip tools add and that are not part of a model.
_ZIP_JUNK_DIRS = ("__MACOSX",)
_ZIP_JUNK_FILES = (".DS_Store", "Thumbs.db")


def _check_name(name: str) -> str:
    """A model name usable as one folder name on every OS (no separators, no '..')."""
    if not _NAME_RE.fullmatch(name) or name.startswith(TEMP_PREFIX) or ".." in name:
        raise ModelLoadError(
            f"invalid model name {name!r}: use letters, digits, '.', '_', '+', '-' (start with a letter or digit)")
    return name


def _shadowing_folder(name: str) -> Path | None:
    """The folder that would be found before the user folder for ``name`` (env or bundled), if any."""
    user = user_models_dir().resolve()
    for origin, folder in search_dirs():
        if origin == "installed" or folder.resolve() == user:
            continue
        if (folder / name / CARD_NAME).is_file():
            return folder / name
    return None


def _validate_staged(staged: Path, load_check: LoadCheck | None) -> ModelCard:
    """Every check a load does (card, sha256, safetensors, architecture), on the files to be installed.

    Runs on the copy, not on the source, so what is checked is exactly what gets installed.
    """
    card = read_card(staged)
    if card.format_version > FORMAT_VERSION:
        raise ModelLoadError(f"model '{card.name}' has format version {card.format_version}; this DiffusionSeg "
                             f"reads up to {FORMAT_VERSION} (update DiffusionSeg)")
    if not (staged / WEIGHTS_NAME).is_file():
        raise ModelLoadError(f"model '{card.name}' has no {WEIGHTS_NAME}")
    # Cheap check first: a wrong sha256 fails here without importing torch.
    if not SHA256_PATTERN.fullmatch(card.weights_sha256 or ""):
        raise ModelLoadError(f"model card of '{card.name}' has no valid weights_sha256")
    verify_weights(staged, card)  # not installed when it fails
    verify_members(staged, card)  # an ensemble's other networks, the same check
    if load_check is None:
        return card
    try:
        # load_model reads safetensors only (never pickle) and builds the network the card describes.
        load_check(staged)
    except ModelLoadError:
        raise
    except (KeyError, IndexError, AttributeError, RuntimeError, TypeError, ValueError) as err:
        # A card from elsewhere can describe a network the builders reject in other ways.
        raise ModelLoadError(f"model '{card.name}' does not load: {type(err).__name__}: {err}") from err
    return card


def _safe_member_parts(info: zipfile.ZipInfo) -> tuple[str, ...] | None:
    """Path parts of a zip entry, None for junk to skip; raises for anything unsafe."""
    raw = info.filename
    mode = info.external_attr >> 16
    if stat.S_ISLNK(mode):
        raise ModelLoadError(f"archive entry {raw!r} is a symbolic link; refused")
    # Backslashes and drive letters are path syntax on Windows (where Slicer often runs).
    if raw.startswith(("/", "\\")) or "\\" in raw or ":" in raw or "\x00" in raw:
        raise ModelLoadError(f"archive entry {raw!r} has an absolute or non-portable path; refused")
    parts = tuple(p for p in raw.split("/") if p not in ("", "."))
    if ".." in parts:
        raise ModelLoadError(f"archive entry {raw!r} points outside the archive ('..'); refused")
    if not parts or parts[0] in _ZIP_JUNK_DIRS or parts[-1] in _ZIP_JUNK_FILES:
        return None
    return parts


def _unpack_zip(archive: Path, dest: Path) -> None:
    """Unpack the one model of ``archive`` (files at its root, or one folder) into ``dest``."""
    try:
        with zipfile.ZipFile(archive) as zf:
            infos = zf.infolist()
            if len(infos) > MAX_ARCHIVE_ENTRIES:
                raise ModelLoadError(f"archive {archive} has {len(infos)} entries; a model has a handful")
            members: list[tuple[tuple[str, ...], zipfile.ZipInfo]] = []
            seen: set[tuple[str, ...]] = set()
            total = 0
            for info in infos:
                parts = _safe_member_parts(info)
                if parts is None or info.is_dir():
                    continue
                if parts in seen:
                    raise ModelLoadError(f"archive {archive} lists {info.filename!r} twice")
                seen.add(parts)
                total += info.file_size
                members.append((parts, info))
            if total > MAX_UNPACKED_BYTES:
                raise ModelLoadError(f"archive {archive} unpacks to {total / 2**30:.1f} GiB, over the "
                                     f"{MAX_UNPACKED_BYTES / 2**30:.0f} GiB limit for a model")
            if (CARD_NAME,) in seen:
                prefix: tuple[str, ...] = ()
            else:
                tops = {parts[0] for parts, _ in members}
                if len(tops) != 1 or (next(iter(tops)), CARD_NAME) not in seen:
                    raise ModelLoadError(f"archive {archive} holds no model: expected {CARD_NAME} at its root "
                                         "or in its one top-level folder")
                prefix = (next(iter(tops)),)
            written = 0
            for parts, info in members:
                if parts[: len(prefix)] != prefix:
                    continue
                target = dest.joinpath(*parts[len(prefix):])
                target.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(info) as src, open(target, "xb") as out:
                    # Count what is really written: the sizes in the archive's directory can lie.
                    for chunk in iter(lambda: src.read(1 << 20), b""):
                        written += len(chunk)
                        if written > MAX_UNPACKED_BYTES:
                            raise ModelLoadError(f"archive {archive} unpacks to more than "
                                                 f"{MAX_UNPACKED_BYTES / 2**30:.0f} GiB; refused")
                        out.write(chunk)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, zlib.error, EOFError, NotImplementedError) as err:
        raise ModelLoadError(f"corrupt or unsupported zip archive {archive}: {err}") from err
    except RuntimeError as err:  # zipfile's way of saying "encrypted, password required"
        raise ModelLoadError(f"cannot unpack {archive}: {err}") from err


def _copy_folder(source: Path, dest: Path) -> None:
    """Copy a model folder's contents into the existing ``dest`` (links are followed: content is copied)."""
    for child in source.iterdir():
        if child.name.startswith(TEMP_PREFIX):
            continue
        if child.is_dir():
            shutil.copytree(child, dest / child.name)
        else:
            shutil.copyfile(child, dest / child.name)


def _remove(path: Path) -> None:
    """Remove a file, link or folder (a link is removed, never what it points to)."""
    if path.is_symlink() or not path.is_dir():
        path.unlink(missing_ok=True)
    else:
        shutil.rmtree(path)


def install_model(source: str | os.PathLike, name: str | None = None, overwrite: bool = False,
                  load_check: LoadCheck | None = None) -> Path:
    """Install a model folder or ``.zip`` archive into ``user_models_dir()/<name or card name>``.

    The files are copied (or unpacked) into a temporary folder next to the destination and fully
    checked there (card, weights sha256, and with ``load_check`` = ``methods.registry.load_model``
    the safetensors and the architecture) before one rename puts them in
    place, so a failed install leaves nothing. An existing model is replaced only with
    ``overwrite=True``. ``name`` changes the folder name only; the card is kept as it is.
    Returns the installed folder. Raises ModelLoadError with the reason.
    """
    source = Path(source).expanduser()
    if name is not None:
        _check_name(name)
    if source.is_dir():
        kind = "folder"
    elif source.is_file() and zipfile.is_zipfile(source):
        kind = "zip"
    elif source.exists():
        raise ModelLoadError(f"not a model folder or .zip archive: {source}")
    else:
        raise ModelLoadError(f"no such model folder or archive: {source}")
    if kind == "folder" and not (source / CARD_NAME).is_file():
        raise ModelLoadError(f"not a DiffusionSeg model folder (no {CARD_NAME}): {source}")

    root = user_models_dir()
    try:
        root.mkdir(parents=True, exist_ok=True)
        staged = Path(tempfile.mkdtemp(prefix=TEMP_PREFIX + "install-", dir=root))
    except OSError as err:
        raise ModelLoadError(f"cannot write to the models folder {root}: {err}") from err
    try:
        try:
            if kind == "zip":
                _unpack_zip(source, staged)
            else:
                _copy_folder(source, staged)
        except OSError as err:
            raise ModelLoadError(f"could not copy the model from {source}: {err}") from err
        card = _validate_staged(staged, load_check)
        final_name = _check_name(name if name is not None else card.name)
        shadow = _shadowing_folder(final_name)
        if shadow is not None:
            raise ModelLoadError(f"a model named '{final_name}' already exists at {shadow} and would be found "
                                 "first; install it under another name (name=..., --name)")
        os.chmod(staged, 0o755)  # mkdtemp makes it private; an installed model is readable like any file
        return _move_into_place(staged, root / final_name, overwrite)
    finally:
        if staged.exists():
            shutil.rmtree(staged, ignore_errors=True)


def _move_into_place(staged: Path, final: Path, overwrite: bool) -> Path:
    """Rename the checked folder to ``final``; an existing model is swapped out only with ``overwrite``."""
    exists = final.exists() or final.is_symlink()
    if exists and not overwrite:
        raise ModelLoadError(f"model '{final.name}' is already installed at {final} (overwrite to replace it)")
    if exists and not (final / CARD_NAME).is_file():
        raise ModelLoadError(f"{final} exists and is not a model folder; not replacing it")
    if not exists:
        try:
            # os.rename refuses to replace a non-empty folder, so a concurrent install is not clobbered.
            os.rename(staged, final)
        except OSError as err:
            raise ModelLoadError(f"could not install '{final.name}' at {final}: {err}") from err
        return final
    # No portable atomic folder swap: move the old one aside, move the new one in, then delete the
    # old one. At every instant either the old or the new complete model is at (or next to) ``final``.
    old = final.with_name(f"{TEMP_PREFIX}old-{final.name}-{os.getpid()}-{time.monotonic_ns()}")
    try:
        os.rename(final, old)
    except OSError as err:
        raise ModelLoadError(f"could not replace {final}: {err}") from err
    try:
        os.rename(staged, final)
    except OSError as err:
        os.rename(old, final)  # put the previous model back
        raise ModelLoadError(f"could not replace {final}: {err}") from err
    try:
        _remove(old)
    except OSError as err:  # the new model is in place; a leftover is cleared by clear_installed_models
        log.warning("could not remove the previous copy %s: %s", old, err)
    return final


def download_model(url: str, sha256: str, name: str | None = None, overwrite: bool = False,
                   progress: Callable[[int, int], None] | None = None, load_check: LoadCheck | None = None) -> Path:
    """Download a model ``.zip`` (http, https or file URL), check its sha256, then ``install_model`` it.

    ``sha256`` (64 hex digits) is the checksum of the archive as published with the model; a
    mismatch fails and leaves no file. Only a GET is sent. ``progress(done_bytes, total_bytes)``
    is called as data arrives (total 0 when the server does not say); an exception raised from it
    cancels the download (the partial file is removed) and propagates. Returns the installed folder.
    """
    digest_expected = sha256.strip().lower()
    if not SHA256_PATTERN.fullmatch(digest_expected):
        raise ModelLoadError("sha256 must be 64 hexadecimal digits (the checksum published with the model)")
    scheme = urllib.parse.urlsplit(url).scheme.lower()
    if scheme not in ("http", "https", "file"):
        raise ModelLoadError(f"unsupported URL {url!r}: use http://, https:// or file://")
    if name is not None:
        _check_name(name)
    root = user_models_dir()
    try:
        root.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=TEMP_PREFIX + "download-", suffix=".zip", dir=root)
    except OSError as err:
        raise ModelLoadError(f"cannot write to the models folder {root}: {err}") from err
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            actual = _fetch(url, out, progress)
        if actual != digest_expected:
            raise ModelLoadError(f"sha256 of the download from {url} is {actual}, expected {digest_expected}: "
                                 "wrong file or corrupted transfer; nothing installed")
        return install_model(tmp, name=name, overwrite=overwrite, load_check=load_check)
    finally:
        tmp.unlink(missing_ok=True)


def _fetch(url: str, out: BinaryIO, progress: Callable[[int, int], None] | None) -> str:
    """GET ``url`` into ``out``; returns the sha256 of the bytes received."""
    from DiffusionSegLib import __version__

    request = urllib.request.Request(url, method="GET", headers={"User-Agent": f"diffusionseg/{__version__}"})
    digest = hashlib.sha256()
    done = 0
    try:
        with urllib.request.urlopen(request, timeout=DOWNLOAD_TIMEOUT_S) as response:
            length = response.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else 0
            if total > MAX_UNPACKED_BYTES:
                raise ModelLoadError(f"{url} is {total / 2**30:.1f} GiB, over the "
                                     f"{MAX_UNPACKED_BYTES / 2**30:.0f} GiB limit for a model")
            if progress is not None:
                progress(0, total)
            for chunk in iter(lambda: response.read(1 << 20), b""):
                done += len(chunk)
                if done > MAX_UNPACKED_BYTES:
                    raise ModelLoadError(f"{url} is over the {MAX_UNPACKED_BYTES / 2**30:.0f} GiB limit for a model")
                digest.update(chunk)
                out.write(chunk)
                if progress is not None:
                    progress(done, total)
    except urllib.error.HTTPError as err:
        raise ModelLoadError(f"download of {url} failed: HTTP {err.code} {err.reason}") from err
    except urllib.error.URLError as err:
        raise ModelLoadError(f"download of {url} failed: {err.reason}") from err
    except (OSError, http.client.HTTPException) as err:  # timeouts, resets, truncated bodies
        raise ModelLoadError(f"download of {url} failed: {type(err).__name__}: {err}") from err
    if total and done != total:
        raise ModelLoadError(f"download of {url} stopped after {done} of {total} bytes")
    return digest.hexdigest()


def clear_installed_models() -> int:
    """Remove the models installed in ``user_models_dir()``; returns how many models were removed.

    Only folders holding a model card (and this module's own leftover temporary files/folders)
    are removed; anything else there is left alone, and so are bundled models and the folders of
    ``$DIFFUSIONSEG_MODELS``. A link to a model is removed, never the model it points to.
    """
    root = user_models_dir()
    if not root.is_dir():
        return 0
    resolved = root.resolve()
    for origin, folder in search_dirs():
        if origin != "installed" and folder.is_dir() and folder.resolve() == resolved:
            # DIFFUSIONSEG_HOME pointed at a folder the user manages some other way.
            raise ModelLoadError(f"{root} is also a {origin} models folder; not clearing it")
    removed = 0
    now = time.time()
    for child in sorted(root.iterdir()):
        try:
            if child.name.startswith(TEMP_PREFIX):
                if now - child.lstat().st_mtime >= _TEMP_GRACE_S:
                    _remove(child)
            elif (child / CARD_NAME).is_file():
                _remove(child)
                removed += 1
        except OSError as err:
            raise ModelLoadError(f"could not remove {child}: {err}") from err
    return removed
