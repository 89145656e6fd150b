"""The HTML report: its data (``data``: sizes, per-layer error, timeline, provenance, from an
original and a rewritten model), its page (``html``: one self-contained file) and its charts
(``charts``: SVG, also written standalone for docs/plots)."""
