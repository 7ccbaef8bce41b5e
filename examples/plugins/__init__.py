"""Worked examples of curate plugins (`filter.custom`, `embed.heads`); see curate/plugins.py for the protocol."""
