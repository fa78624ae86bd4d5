"""Safe, signed, reproducible artifacts of compressed ``torch.fx.GraphModule``s.

One file, a zip (stored, fixed timestamps, sorted members: saving the same
model twice gives the same bytes) holding:

``graph.json``
    the fx graph as data (:mod:`.graph_codec`): nodes with allow-listed
    targets (:mod:`.allowlist`), ``call_module`` leaves as type name + config
    (:mod:`.modules`), and a table saying where each tensor lives.
``weights.safetensors``
    every tensor the graph reaches, each stored once even where shared.
``manifest.json``
    format version, fxcompress/torch/python versions, the pass pipeline with
    options, the source model's state hash, the report, the ``parent``
    artifact's id, the SHA-256 of the two members above, the signature block.
``manifest.sig`` (signed artifacts only)
    the Ed25519 signature of ``manifest.json``'s exact bytes.

The zip comment holds the SHA-256 of ``manifest.json``.  Loading checks all of
it (:mod:`.core`) and then rebuilds the model without unpickling or executing
anything from the file.  The artifact's id is that manifest hash.

Storing your own modules
------------------------
A ``call_module`` leaf must be a supported ``torch.nn`` module, a container of
such, or a registered class.  To make a class storable (fxcompress's lowered
quantized modules do this), give it a stable name and two methods, and
register it when its module is imported::

    @register_module
    class QLinear(nn.Module):
        _fxc_name = "fxcompress.quant.lowered.QLinear"

        def _fxc_config(self) -> dict:          # constructor-level config: ints, floats,
            return {"in_features": ..., ...}    # str, tuples, dtypes, ... (see .values)

        @classmethod
        def _fxc_from_config(cls, config, state):
            # state: this module's state_dict() as loaded (nn.Parameter for parameters)
            module = cls(**config)               # or a cheaper path that skips init
            module.load_state_dict(state, assign=True)
            return module                        # rebuild caches (prepacked weights) here

The tensors stored for a registered leaf are its ``state_dict()``, so keep
caches that cannot be serialized (oneDNN prepacked weights) out of it (plain
attributes or non-persistent buffers) and rebuild them in ``_fxc_from_config``.
The loader checks that the rebuilt module has exactly the stored tensors.
``register_module(cls, to_config=..., from_config=...)`` does the same for a
class you cannot edit.  Functions called by the graph must be allow-listed;
register pure tensor functions with :func:`register_function`.
"""

from fxcompress.artifact.allowlist import register_function
from fxcompress.artifact.core import FORMAT_VERSION, SUPPORTED_VERSIONS, check_target, load, save, verify
from fxcompress.artifact.modules import register_module, supported_modules
from fxcompress.artifact.signing import generate_keypair

__all__ = [
    "FORMAT_VERSION",
    "SUPPORTED_VERSIONS",
    "save",
    "check_target",
    "load",
    "verify",
    "generate_keypair",
    "register_module",
    "register_function",
    "supported_modules",
]
