"""This community's patients: the local directory (demographics) and the cross-reference of
identifiers across domains."""
