"""May this run write its checkpoint here? One answer for every workflow that saves a model.

    claim = claim_output("out/ckpt", kind="gpt", resume=..., overwrite=..., inputs=[...],
                         companions=["out/log.jsonl"])      # before any work: refuses, or says yes
    ... every other check, then:
    claim.begin()      # an --overwrite'n checkpoint (and its companions) move to a dated backup
    ... the run writes and rewrites its own checkpoint ...
    claim.complete()   # the new checkpoint is whole: the backup goes

A run may write ``path`` when nothing is there, or when the checkpoint there
is the one it resumes. It refuses (``OutputRefused``, a ValueError: one line
from the CLI) before doing any work when ``path``

- is one of the run's own inputs (``sae train --checkpoint out/ckpt --out-dir out/ckpt``);
- is a file, or a non-empty directory that is not an npflux checkpoint
  (``--overwrite`` does not change that: such files are never moved or removed);
- holds a checkpoint (or the previous version an interrupted save left,
  ``atomic.previous_version``) and the run neither resumes it nor was told
  ``--overwrite``; ``companions`` (a run's ``log.jsonl``) count the same way;
- is asked to resume, but holds no checkpoint, or one of another kind.

With ``overwrite`` the old checkpoint is not deleted up front: ``begin``
renames it ``<name>.replaced-<date>-<time>`` beside itself, and only
``complete`` removes it, so a run that diverges or is killed leaves the old
model where the message said.
"""
from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import FILES, META_FILE, CheckpointError, CheckpointNotFound, read_meta
from .atomic import previous_version


class OutputRefused(CheckpointError):
    """The run would replace something it did not write; the message says how to proceed."""


def find_checkpoint(path) -> Path | None:
    """Where the checkpoint of ``path`` is: ``path`` itself, the previous version an interrupted save
    left beside it (which ``load_checkpoint`` reads, with a warning), or None."""
    path = Path(path)
    if (path / META_FILE).is_file():
        return path
    return previous_version(path, META_FILE, FILES)


def _kind_and_step(path):
    """(kind or None, step or None) of the checkpoint at ``path``, from its meta.json; (None, None) if unreadable."""
    from .kinds import KINDS, infer_kind

    try:
        _, meta = read_meta(path)
    except CheckpointError:
        return None, None
    kind = meta.get("kind") or infer_kind(meta.get("config"))
    step = meta.get("step")
    return (kind if kind in KINDS else None), (step if isinstance(step, int) else None)


def _describe(path, kind, step):
    from .kinds import KINDS

    what = KINDS[kind].what if kind else "a checkpoint"
    return f"{path} holds {what}" + (f" (step {step})" if step else "")


@dataclass
class OutputClaim:
    """A run's permission to write ``path``; see the module docstring."""

    path: Path
    replaces: list = field(default_factory=list)  # (what, named after) --overwrite moves aside in begin()
    backups: list = field(default_factory=list)   # where it went
    log: object = print

    def begin(self):
        """Move what --overwrite replaces to dated backups (once; call it just before the first step or write)."""
        stamp = time.strftime("%Y%m%d-%H%M%S")
        for old, name in self.replaces:
            backup, n = name.with_name(f"{name.name}.replaced-{stamp}"), 1
            while os.path.lexists(backup):
                backup, n = name.with_name(f"{name.name}.replaced-{stamp}-{n}"), n + 1
            os.replace(old, backup)
            self.backups.append(backup)
            self.log(f"--overwrite: moved {old} to {backup} (removed once the new checkpoint is complete)")
        self.replaces = []

    def complete(self):
        """The new checkpoint is whole: remove the backups ``begin`` made."""
        for backup in self.backups:
            if backup.is_dir():
                shutil.rmtree(backup, ignore_errors=True)
            elif os.path.lexists(backup):
                backup.unlink()
        self.backups = []


def claim_output(path, *, kind, resume=False, overwrite=False, inputs=(), companions=(), flag="--out-dir",
                 can_resume=True, log=print) -> OutputClaim:
    """Decide, before any work, whether a run of ``kind`` may write its checkpoint to ``path``.

    ``resume``: the run continues the checkpoint at ``path`` (which must be
    there, and of ``kind``). ``overwrite``: an existing checkpoint is
    replaced, kept as a dated backup until ``complete()``. ``inputs``: the
    checkpoints the run reads (never written over). ``companions``: files of
    the run beside its checkpoint (``log.jsonl``), protected with it. ``flag``
    is the option that names ``path`` (for the message), ``can_resume``
    whether the command has ``--resume``. Returns an ``OutputClaim``; raises
    ``OutputRefused`` with what to do instead.
    """
    from .kinds import KINDS

    if resume and overwrite:
        raise OutputRefused("--resume continues the checkpoint and --overwrite replaces it: pass one of them")
    path = Path(path)
    where = path.resolve()
    for source in (Path(s) for s in inputs if s is not None):
        if where == source.resolve() or where in source.resolve().parents:
            what = "is" if where == source.resolve() else "holds"
            raise OutputRefused(f"{path} {what} this run's input checkpoint {source}; writing there would replace "
                                f"it: pick another {flag}")
    if os.path.lexists(path) and not path.is_dir():
        raise OutputRefused(f"{path} exists and is not a directory; pick another {flag}")
    found = find_checkpoint(path)
    if found is None and path.is_dir() and any(path.iterdir()):
        raise OutputRefused(f"{path} is not empty and is not an npflux checkpoint (nothing there is moved or "
                            f"removed): pick another {flag}, or empty it")
    kind_found, step = _kind_and_step(path) if found is not None else (None, None)
    if resume:
        if found is None:
            raise CheckpointNotFound(f"--resume: no checkpoint in {path}")
        if kind_found is not None and kind_found != kind:  # (an unreadable one: loading it says why)
            raise OutputRefused(f"--resume: {_describe(path, kind_found, step)}, not {KINDS[kind].what}'s "
                                f"training checkpoint; pick another {flag}")
        return OutputClaim(path, log=log)
    companions = [Path(c) for c in companions if os.path.lexists(c) and Path(c).stat().st_size > 0]
    taken = ([(found, path)] if found is not None else []) + [(c, c) for c in companions]
    if taken and not overwrite:
        what = _describe(path, kind_found, step) if found is not None else f"{companions[0]} holds another run's log"
        ways = (["continue it with --resume"] if can_resume and found is not None and kind_found == kind else []) + \
            ["replace it with --overwrite (the old one kept as a dated backup until the new checkpoint is complete)",
             f"or pick another {flag}"]
        raise OutputRefused(f"{what}, written by another run; refusing to replace it: {', '.join(ways)}")
    return OutputClaim(path, replaces=taken, log=log)


__all__ = ["OutputClaim", "OutputRefused", "claim_output", "find_checkpoint"]
