"""Where a site's rows come from: a table file, a FHIR R4 bulk export or an OMOP CDM database.

Each source is read at the site into one row per index encounter (or per row of a
table) and then goes through the same schema checks as a CSV file.
"""
