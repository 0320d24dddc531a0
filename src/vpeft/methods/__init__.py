"""Built-in methods, one file each, in folders that follow the PEFT taxonomy.

Every module under this package is imported by the registry, so a new method is one new file.
"""
