"""Every error partita raises on purpose.

Each class names one failure a user can act on; its message says what went wrong and what to do.
The CLI turns any `PartitaError` into one line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations


class PartitaError(Exception):
    """Base of every error partita raises on purpose."""


class ModelRefError(PartitaError):
    """A model reference could not be resolved (unknown form, missing file or factory)."""


class CaptureError(PartitaError):
    """torch.export could not capture the model; the message names the op or module."""


class SplitError(PartitaError):
    """A split was asked for at cut points the model graph does not have."""


class StageFormatError(PartitaError):
    """Bytes offered as a stage archive are not a valid, untampered torch.export archive."""


class ClusterSpecError(PartitaError):
    """A cluster description is invalid; the message names the file, the field and what was expected."""


class PlanError(PartitaError):
    """No plan satisfies the constraints (usually memory); the message says what is needed and available."""


class ProfileError(PartitaError):
    """A model profile (the JSON that `partita inspect --json` prints) is malformed."""


class WireError(PartitaError):
    """A frame or message on the wire is malformed or breaks a configured limit."""


class AuthError(PartitaError):
    """Keys are missing or wrong, or a peer was refused."""


class WorkerError(PartitaError):
    """A worker refused a command or reported a failure."""


class DeployError(PartitaError):
    """A plan could not be deployed onto the workers."""


class RequestError(PartitaError):
    """A request that was accepted could not be answered; the message says why."""


class EmulationError(PartitaError):
    """An emulated device or link was asked for something it cannot do."""


class FLError(PartitaError):
    """Federated training failed: an unknown task, no clients left, or a bad update."""


class StageInputError(PartitaError):
    """Tensors given to a stage do not match what it takes (count, dtype or shape)."""


class ServeError(PartitaError):
    """`partita serve` cannot start or serve as asked (a model without a dynamic batch, a bad option)."""


class InferRequestError(PartitaError):
    """An inference request over HTTP is malformed; the message says what was expected (HTTP 400)."""


class TileError(PartitaError):
    """A fused block cannot be tiled as asked (a layer that mixes positions, a grid larger than the map)."""
