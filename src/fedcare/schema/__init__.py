"""Feature schema, site mappings, unit conversion and data readers.

Import from the modules (``fedcare.schema.mapping`` and so on): the package itself
imports nothing, so reading a study does not load pandas.
"""
