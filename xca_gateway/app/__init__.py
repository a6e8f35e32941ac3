"""The composition root: one community's gateway wired from its configuration, and how it is
served. The only layer that knows all the others."""
