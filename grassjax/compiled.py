"""What XLA reports about a compiled function (FLOPs, memory), for the training loop and the
benchmarks.

Every helper returns None where the backend does not report it: a missing number is never mistaken
for 0.
"""

from __future__ import annotations


def compiled_flops(compiled) -> float | None:
    """XLA's own FLOP count for one call (`compiled.cost_analysis()['flops']`), None if
    unavailable."""
    try:
        cost = compiled.cost_analysis()
    except Exception:  # noqa: BLE001 - some backends do not implement it
        return None
    if isinstance(cost, (list, tuple)):  # older JAX returned one dict per device
        cost = cost[0] if cost else None
    if not cost or "flops" not in cost:
        return None
    flops = float(cost["flops"])
    return flops if flops > 0 else None


def compiled_memory(compiled) -> dict[str, int] | None:
    """The static memory analysis of a compiled executable, in bytes, or None."""
    try:
        m = compiled.memory_analysis()
    except Exception:  # noqa: BLE001
        return None
    if m is None:
        return None
    get = lambda name: int(getattr(m, name, 0) or 0)
    return {
        "argument_bytes": get("argument_size_in_bytes"),
        "output_bytes": get("output_size_in_bytes"),
        "temp_bytes": get("temp_size_in_bytes"),
        "alias_bytes": get("alias_size_in_bytes"),
        "generated_code_bytes": get("generated_code_size_in_bytes"),
    }


def compiled_memory_bytes(compiled) -> int | None:
    """Memory one call needs by XLA's static buffer assignment: arguments + outputs + temporaries -
    aliased (donated buffers are counted in both arguments and outputs); None if unavailable."""
    m = compiled_memory(compiled)
    if m is None:
        return None
    return m["argument_bytes"] + m["output_bytes"] + m["temp_bytes"] - m["alias_bytes"]
