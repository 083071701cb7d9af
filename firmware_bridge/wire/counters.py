"""Link and decoder counters summed over every link one side has used, reconnections included.

A side replaces its Link when the peer is lost (a fresh link waits for the next HELLO), and each
Link counts only its own traffic; a report that read the last link alone would show a profile
that reconnected twice as if the line had been clean until the end.
"""

from __future__ import annotations

from firmware_bridge.wire.link import Link

__all__ = ["LinkCounters"]

SECTIONS = ("decoder", "link")


class LinkCounters:
    """Totals of retired links, plus the live one on demand."""

    def __init__(self) -> None:
        self.links_retired = 0
        self._retired: dict[str, dict[str, int]] = {section: {} for section in SECTIONS}

    @staticmethod
    def _read(link: Link) -> dict[str, dict[str, int]]:
        return {"decoder": link.decoder_stats.as_dict(), "link": link.stats.as_dict()}

    def retire(self, link: Link) -> None:
        """Add `link`'s counters to the totals; call once, when the link is dropped."""
        self.links_retired += 1
        for section, stats in self._read(link).items():
            totals = self._retired[section]
            for key, value in stats.items():
                totals[key] = totals.get(key, 0) + value

    def totals(self, live: Link | None = None) -> dict[str, dict[str, int]]:
        """Return {"decoder": ..., "link": ...} over every retired link and `live`."""
        if live is None:
            return {section: dict(values) for section, values in self._retired.items()}
        out = {}
        for section, stats in self._read(live).items():
            retired = self._retired[section]
            out[section] = {key: value + retired.get(key, 0) for key, value in stats.items()}
        return out
