"""What torch's ONNX exporter failed on, in one sentence: the node, its operator, why.

torch's exporter (``torch.onnx.export(..., dynamo=True)``) reports a failure as a long
report (next steps, an exception summary, a chain of nested errors). The user needs three
things from it: which node of the graph has no ONNX form, which operator that node calls,
and the exporter's reason. :func:`exporter_failure` pulls them out of the report's text
(the exporter's errors carry no structured fields for them); what it cannot recognise it
passes on as the report's first meaningful line, never an empty message.
"""

from __future__ import annotations

import re

__all__ = ["exporter_failure"]

# "Error when translating node %kthvalue : [num_users=1] = call_function[target=torch.ops.aten.kthvalue.default](...)"
_NODE = re.compile(r"Error when translating node %(?P<node>[\w.]+) : .*?call_function\[target=(?P<target>[^\]]+)\]")
# "<class '...DispatchError'>: No ONNX function found for <OpOverload(op='aten.kthvalue', ...)>. Failure message: ..."
_REASON = re.compile(r"<class '(?:[\w.]+\.)?(?P<kind>\w+)'>: (?P<reason>[^\n]+)")
_STEP = re.compile(r"This is step (?P<step>\d)/3")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def exporter_failure(exc: BaseException, model_name: str, dynamic: bool) -> str:
    """A one-paragraph description of why torch's exporter failed on ``model_name``: the node
    and operator with no ONNX translation where the report names one, the reason, what to do."""
    text = _ANSI.sub("", "\n".join(str(e) for e in _chain(exc)))
    node = _NODE.search(text)
    reasons = [m for m in _REASON.finditer(text) if "Error when translating node" not in m["reason"]]
    reason = reasons[0]["reason"].strip() if reasons else _first_line(text)
    step = _STEP.search(text)
    if node:
        target = node["target"].removeprefix("torch.ops.")
        return (f"node %{node['node']} of {model_name} calls {target}, which torch's ONNX exporter cannot "
                f"translate ({reason}); keep that computation out of the exported model or replace it "
                f"with operators ONNX has")
    if step and step["step"] == "1" and dynamic:
        return (f"torch.export failed on {model_name} with symbolic input sizes ({reason}); "
                f"dynamic_batch=False fixes the batch size to the example's")
    return f"torch's ONNX exporter failed on {model_name}: {type(exc).__name__}: {reason}"


def _chain(exc: BaseException) -> list[BaseException]:
    out, seen = [], set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        out.append(exc)
        exc = exc.__cause__ or exc.__context__
    return out


def _first_line(text: str) -> str:
    return next((line.strip() for line in text.splitlines() if line.strip()), "no message")
