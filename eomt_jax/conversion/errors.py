"""How a conversion fails: `ConversionError`, and the one report listing every unknown, missing and mis-shaped key."""

from __future__ import annotations


class ConversionError(ValueError):
    """A checkpoint that cannot be converted; the message lists every offending key."""


def problem_report(unknown, missing, shapes) -> str:
    lines = ["the checkpoint does not match the EoMT architecture:"]
    if unknown:
        lines.append(f"  {len(unknown)} unexpected key(s): " + ", ".join(sorted(unknown)))
    if missing:
        lines.append(f"  {len(missing)} missing key(s): " + ", ".join(sorted(missing)))
    for s in shapes:
        lines.append("  " + s)
    return "\n".join(lines)
