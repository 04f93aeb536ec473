"""Inspection: what a compile did, shown to a person -- `explain`, the `fusebackend dump` CLI and its text,
SVG and DOT renderers. It reads every layer below (and compiles through capture); nothing imports it."""
