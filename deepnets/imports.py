"""Import paths in configs: `path/to/file.py:Name` or `package.module:Name` -> the class it names.

This is how a user's own code joins an extension table (`model.arch`, `optim.name`) without editing the
package. A config that names code runs that code: importing the file executes it, as `python file.py`
would. Every failure (no file, no module, no attribute, not a class, not a subclass of `base`, an
exception raised by the user's code while it is imported) is one `UserError` line naming the config key;
an exception inside the user's code names the file:line in the user's code, not a traceback.

Relative file paths: `anchor(spec, base_dir)` makes a relative file path absolute against `base_dir`
(config loading anchors a path written in a config file at that file's directory); a path still relative
when it is resolved is taken from the current directory. The resolved spec records the absolute path, so
a run's config.yaml imports the same file from any working directory.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib
import importlib.util
import os
import re
import sys
import traceback
from pathlib import Path
from types import ModuleType, TracebackType

from deepnets.errors import UserError

__all__ = ["absolute_spec", "anchor", "is_import_path", "resolve_import", "user_frame"]

_MODULE = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")
_ATTR = _MODULE  # `Name` or `Outer.Name`
# module objects of the files imported so far, by absolute path: a file runs once per process, as a module does
_FILES: dict[str, ModuleType] = {}


def is_import_path(value: str) -> bool:
    """True for `something:Name` (a file or module path and an attribute); built-in names have no ':'."""
    return ":" in value


def _is_file_target(target: str) -> bool:
    return target.endswith(".py") or "/" in target or os.sep in target


def anchor(spec: str, base_dir: str | Path) -> str:
    """`spec` with a relative file path made absolute against `base_dir`; anything else unchanged."""
    target, sep, name = spec.rpartition(":")
    if not sep or not _is_file_target(target):
        return spec
    path = Path(os.path.expanduser(target))  # `~` expanded once, here, as for the config's other paths
    if not path.is_absolute():
        path = (Path(base_dir) / path).resolve()
    return f"{path}:{name}"


def absolute_spec(spec: str) -> str:
    """`spec` with a relative file path made absolute against the current directory (what config.yaml records)."""
    return anchor(spec, Path.cwd())


def resolve_import(spec: str, key: str, base: type | None = None) -> type:
    """The class `spec` names (`path/to/file.py:Name` or `package.module:Name`), a subclass of `base`.

    `key` is the config key the spec came from; every failure is a UserError naming it.
    """
    target, sep, name = spec.rpartition(":")
    if not sep or not target or not name:
        raise UserError(
            f"{key}: {spec!r} is not an import path (allowed: path/to/file.py:ClassName, package.module:ClassName)"
        )
    if not _ATTR.match(name):
        raise UserError(f"{key}: {name!r} after ':' in {spec!r} is not a Python name")
    module = _import_file(target, key) if _is_file_target(target) else _import_module(target, key)
    obj: object = module
    for part in name.split("."):
        if not hasattr(obj, part):
            where = target if obj is module else f"{target}:{name.rsplit('.', 1)[0]}"
            choices = [n for n in vars(obj) if not n.startswith("_") and isinstance(getattr(obj, n), type)]
            near = difflib.get_close_matches(part, choices, n=1, cutoff=0.5)
            hint = f"; did you mean {near[0]}?" if near else (f" (it has: {', '.join(choices[:8])})" if choices else "")
            raise UserError(f"{key}: {where} has no attribute {part!r}{hint}")
        obj = getattr(obj, part)
    if not isinstance(obj, type):
        raise UserError(f"{key}: {target}:{name} is a {type(obj).__name__}, not a class")
    if base is not None and not issubclass(obj, base):
        raise UserError(f"{key}: {target}:{name} is not a subclass of {base.__module__}.{base.__qualname__}")
    return obj


def _import_file(target: str, key: str) -> ModuleType:
    path = Path(os.path.expanduser(target))
    try:
        path = path.resolve()
        if not path.is_file():
            what = "is not a file" if path.exists() else "not found"
            raise UserError(f"{key}: file {path} {what}")
    except OSError as e:  # a name too long, a loop of links
        raise UserError(f"{key}: cannot read {target}: {e.strerror or e}") from None
    cached = _FILES.get(str(path))
    if cached is not None:
        return cached
    # A unique, stable module name per file: two files both called model.py do not collide, and
    # classes defined there get a __module__ that sys.modules resolves (dataclasses and pickling need it).
    digest = hashlib.sha1(str(path).encode("utf-8", "surrogatepass")).hexdigest()[:10]
    stem = re.sub(r"\W", "_", path.stem)
    mod_name = f"deepnets_user_{stem}_{digest}"
    spec = importlib.util.spec_from_file_location(mod_name, path)
    if spec is None or spec.loader is None:
        raise UserError(f"{key}: cannot import {path} (not a Python source file)")
    module = importlib.util.module_from_spec(spec)
    sys.modules[mod_name] = module
    try:
        spec.loader.exec_module(module)
    except (Exception, SystemExit) as e:  # the user's code raised while it was imported
        del sys.modules[mod_name]
        raise UserError(f"{key}: importing {path} failed: {user_frame(e, str(path))}") from None
    _FILES[str(path)] = module
    return module


def _import_module(target: str, key: str) -> ModuleType:
    if not _MODULE.match(target):
        raise UserError(f"{key}: {target!r} is neither a .py file nor a dotted module name")
    try:
        return importlib.import_module(target)
    except ModuleNotFoundError as e:
        if e.name is not None and (target == e.name or target.startswith(e.name + ".")):
            raise UserError(f"{key}: no module named {e.name!r} (is it installed, or on PYTHONPATH?)") from None
        raise UserError(f"{key}: importing {target} failed: {user_frame(e, None)}") from None
    except (Exception, SystemExit) as e:
        raise UserError(f"{key}: importing {target} failed: {user_frame(e, None)}") from None


def user_frame(e: BaseException, path: str | None) -> str:
    """`file:line: Type: message` of the innermost frame in the user's code (in `path`, else outside importlib)."""
    msg = " ".join(str(e).split()) or type(e).__name__
    if isinstance(e, SyntaxError) and e.filename:
        return f"{e.filename}:{e.lineno}: SyntaxError: {e.msg}"
    frames = traceback.extract_tb(e.__traceback__ if isinstance(e.__traceback__, TracebackType) else None)
    if path is not None:
        mine = [f for f in frames if f.filename == path]
    else:
        mine = [f for f in frames if "importlib" not in f.filename and not f.filename.startswith("<frozen")]
        mine = [f for f in mine if Path(f.filename).resolve() != Path(__file__).resolve()]
    where = f"{mine[-1].filename}:{mine[-1].lineno}: " if mine else ""
    return f"{where}{type(e).__name__}: {msg}"
