"""What a run keeps on disk: its log (``log.jsonl``) and its checkpoint (``checkpoint.npz``).

The checkpoint holds the model, the optimiser, the data loader's position, the random state
and the config; it is written atomically (minifcn.checkpoint). The log is appended a line a
step, and cut back to the checkpoint's iteration when a run resumes.
"""

import dataclasses
import glob
import json
import os

from minifcn.checkpoint import atomic_write, load_checkpoint, read_checkpoint_extra, save_checkpoint

# settings a resumed run may change: where it writes and what it runs on
_FREE_TO_CHANGE = ("out", "device", "processes")


def remove_stale_temporaries(out):
    """Delete the temporary files of a run killed while it wrote a checkpoint."""
    for stale in glob.glob(os.path.join(glob.escape(out), ".checkpoint.*.tmp.npz")):
        os.remove(stale)


def save_run(path, model, optimizer, iteration, loader, config):
    save_checkpoint(path, model, optimizer, iteration=iteration, loader=loader.state_dict(),
                    config=dataclasses.asdict(config))


def load_run(path, model, optimizer, loader, config):
    """Restore what ``save_run`` wrote (and the random state); returns the saved extras.

    A checkpoint that does not fit says first how its config differs from ``config``."""
    try:
        extra = load_checkpoint(path, model, optimizer, restore_rng=True)
        loader.load_state_dict(extra["loader"])
    except ValueError as err:
        changes = config_changes(path, config)
        if changes:  # the likely cause first; the first lines of the details after it
            lines = str(err).splitlines()
            err = "\n".join(lines[:3] + (["  ..."] if len(lines) > 3 else []))
        raise ValueError(f"cannot resume from {path}: {changes}{err}") from None
    return extra


def config_changes(path, config):
    """How ``config`` differs from the checkpoint's, as text for an error message ("" if not)."""
    try:
        saved = read_checkpoint_extra(path)["config"]
    except (ValueError, KeyError, TypeError):
        return ""
    now = dataclasses.asdict(config)
    changed = [key for key in now if key not in _FREE_TO_CHANGE and saved.get(key) != now[key]]
    if not changed:
        return ""
    return (f"the checkpoint was written with {', '.join(f'{k}={saved.get(k)!r}' for k in changed)}; "
            f"this run has {', '.join(f'{k}={now[k]!r}' for k in changed)}. "
            "Resume with the same settings, or choose another output folder.\n")


def read_log(path):
    """The records of ``log.jsonl`` ([] if there is none)."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        lines = f.read().split("\n")
    # a run killed while appending may leave a partial last line: it is dropped (the step it
    # described is after the checkpoint anyway, and is done again)
    return [json.loads(line) for line in lines[:-1] if line.strip()]


def append_log(path, record):
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def rewrite_log(path, records):
    """Replace the log by ``records``, atomically."""
    atomic_write(path, lambda tmp: _write_lines(tmp, records))


def _write_lines(path, records):
    with open(path, "w") as f:
        f.writelines(json.dumps(record) + "\n" for record in records)
