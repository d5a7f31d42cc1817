"""``python -m schemas``: regenerate the committed JSON Schema files."""

from schemas.jsonschema import export

for path in export():
    print(path)
