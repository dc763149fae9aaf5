"""Interventions registered at run time through the admin endpoint (:mod:`.admin`), kept on disk so
the API server (which checks requests) and the worker (which fills the tables) read the same bytes.

Under the registry directory (created 0700):

* ``<version>/entry.json`` (``{"name": N, "entry": E}``, ``E`` a recipe entry whose ``file``, ``map``
  and ``gate.direction`` name uploaded files) and the uploaded files, written whole and renamed;
* ``names.json``: ``{name: version}``, replaced atomically.

A version is a hash of the name, the entry and every file's bytes, so replacing an intervention's
tensors under the same name gives a new version, hence a new prefix-cache salt and a new table slot
(:mod:`.salts`, :mod:`.steering_state`). Old versions stay until no request in flight names them.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from collections import OrderedDict
from pathlib import Path

from ..recipe import Recipe, RecipeError
from ..utils.atomic import atomic_directory, write_atomic
from .options import check_served

NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
FILE_KEY = re.compile(r"[A-Za-z0-9_-]{1,64}\.(safetensors|gguf)")
VERSION = re.compile(r"[0-9a-f]{32}")
NAMES, ENTRY = "names.json", "entry.json"
_CACHED = 256


class RegistryError(ValueError):
    """A refused registration: HTTP ``status``, ``field`` names the offending part of the body."""

    def __init__(self, field: str, message: str, status: int = 400):
        super().__init__(message)
        self.field, self.status = field, status


def version_of(name: str, entry: dict, files: dict[str, bytes]) -> str:
    digests = {key: hashlib.sha256(data).hexdigest() for key, data in sorted(files.items())}
    return hashlib.sha256(json.dumps([name, entry, digests], sort_keys=True).encode()).hexdigest()[:32]


def file_fields(entry: dict) -> dict[str, object]:
    """The entry's fields that name files (``file``, ``map``, ``gate.direction``, ``gate.condition``)."""
    out = {k: entry[k] for k in ("file", "map") if k in entry}
    gate = entry.get("gate")
    if isinstance(gate, dict):
        out.update({f"gate.{k}": gate[k] for k in ("direction", "condition") if k in gate})
    return out


def check_upload(name, entry, files) -> None:
    """Names and file references of a registration, before anything is written."""
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise RegistryError("name", f"an intervention name is 1-64 of A-Z a-z 0-9 _ -, got {name!r}")
    if not isinstance(entry, dict):
        raise RegistryError("entry", "must be a recipe entry (a mapping)")
    if not isinstance(files, dict) or not all(isinstance(k, str) and FILE_KEY.fullmatch(k) for k in files):
        raise RegistryError("files", "must map names like 'v.safetensors' or 'v.gguf' (1-64 of A-Z a-z 0-9 _ -) "
                                     "to file contents")
    named = file_fields(entry)
    for field, value in named.items():
        if value not in files:
            raise RegistryError(f"entry.{field}", f"must name one of the uploaded files {sorted(files)}, got {value!r}")
    unused = sorted(set(files) - set(named.values()))
    if unused:
        raise RegistryError("files", f"{unused} are not named by the entry")


def _parse(name: str, entry: dict, base: Path):
    where = f"steering.vectors.{name}"
    try:
        recipe = check_served(Recipe.from_dict({"steering": {"vectors": {name: entry}}}, base=base), conditions=False)
    except RecipeError as exc:
        raise RegistryError("entry", str(exc).replace(where, "entry").replace(str(base) + "/", "")) from None
    return recipe.steers[name]


class Registry:
    """The registry directory ``root``. The API server ``owns`` it (writes names and removes unused
    versions); workers only :meth:`load`."""

    def __init__(self, root: str | Path, owns: bool = False):
        self.root = Path(root)
        if owns:
            self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        names = self.root / NAMES
        self.names: dict[str, str] = json.loads(names.read_text()) if names.is_file() else {}
        self._cache: OrderedDict[str, object] = OrderedDict()

    def load(self, name: str, version: str):
        """The intervention ``name`` at ``version`` (cached)."""
        if not VERSION.fullmatch(version):
            raise ValueError(f"{version!r} is not a registry version")
        if version not in self._cache:
            record = json.loads((self.root / version / ENTRY).read_text())
            if record["name"] != name:
                raise ValueError(f"registry version {version} holds {record['name']!r}, not {name!r}")
            self._cache[version] = _parse(name, record["entry"], self.root / version)
            while len(self._cache) > _CACHED:
                self._cache.popitem(last=False)
        self._cache.move_to_end(version)
        return self._cache[version]

    def stage(self, name: str, entry: dict, files: dict[str, bytes], check) -> tuple[str, object]:
        """Write version of (``name``, ``entry``, ``files``) unless present; ``check(steer)`` runs before
        it is installed. Returns (version, intervention); nothing changes when either raises."""
        check_upload(name, entry, files)
        version = version_of(name, entry, files)
        if (self.root / version).is_dir():
            steer = self.load(name, version)
            check(steer)
            return version, steer
        with atomic_directory(self.root / version) as tmp:
            for key, data in files.items():
                (tmp / key).write_bytes(data)
            steer = _parse(name, entry, tmp)
            check(steer)
            (tmp / ENTRY).write_text(json.dumps({"name": name, "entry": entry}))
        self._cache[version] = steer
        return version, steer

    def set_names(self, names: dict[str, str]) -> None:
        write_atomic(self.root / NAMES, json.dumps(names, sort_keys=True))
        self.names = dict(names)

    def collect(self, keep: set[str]) -> None:
        """Remove version directories no name and nothing in ``keep`` refers to."""
        live = set(self.names.values()) | keep
        for path in self.root.iterdir():
            if path.is_dir() and VERSION.fullmatch(path.name) and path.name not in live:
                shutil.rmtree(path, ignore_errors=True)
                self._cache.pop(path.name, None)
