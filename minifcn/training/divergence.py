"""When the loss or a gradient turns NaN or infinite: stop, and say where it began.

The step that went wrong is replayed with its own random state and dropout masks, under
``detect_anomaly``, which checks every op's output, so the message names the first op that
made a NaN or infinity, or says that the input images already held one.
"""

import os

from minifcn import nn
from minifcn.autograd import NonFiniteError, detect_anomaly
from minifcn.training.step import all_finite


class TrainingDiverged(FloatingPointError):
    """The loss or a gradient became NaN or infinite."""

    on_every_rank = True  # decided on sums over the ranks, so every rank raises it alike


def checkpoint_note(checkpoint_path):
    """What an error message says about the last checkpoint."""
    if os.path.exists(checkpoint_path):
        return f"The last checkpoint ({checkpoint_path}) is intact"
    return "No checkpoint was written yet"


def explain_nonfinite(replay, model, group, images, iteration, loss_value, checkpoint_path):
    """The TrainingDiverged message for a step whose loss or gradient was not finite.

    replay(): the step's forward and backward again, with its random state and dropout masks.
    With several ranks each replays its own share alone (BatchNorm on the share's statistics:
    an op that stopped half-way must not leave the others waiting for its sums), and the first
    rank that found an op names it.
    """
    found = None
    try:
        with detect_anomaly(), nn.each_rank_alone(model):
            replay()
    except NonFiniteError as err:
        found = f"the {err.where}" + (f" (rank {group.rank})" if group.size > 1 else "")
    bad_input = not all_finite([images])
    reports = group.all_gather((found, bad_input))
    found = next((where for where, _ in reports if where is not None), None)
    where = found or "no single op (the values overflowed only when combined)"
    if any(bad for _, bad in reports):
        where += "; the input images of this batch already hold NaN or infinity"
        advice = "check the dataset, or pass on_nonfinite='skip'"
    else:
        advice = "lower the learning rate or pass on_nonfinite='skip'"
    return (f"iteration {iteration}: the loss is {loss_value} or a gradient is not finite; "
            f"first non-finite value: {where}. {checkpoint_note(checkpoint_path)}; {advice}.")


def check_update(model, optimizer, iteration, checkpoint_path):
    """Raise TrainingDiverged if the update made a parameter non-finite: it cannot be undone."""
    if all_finite(p.data for p in optimizer.params):
        return
    names = {id(p): name for name, p in model.named_parameters()}
    broken = [names.get(id(p), "?") for p in optimizer.params if not all_finite([p.data])]
    raise TrainingDiverged(
        f"iteration {iteration}: the update made parameters {broken[:5]} non-finite "
        f"(lr {optimizer.lr:g} is far too large?). {checkpoint_note(checkpoint_path)}.")
