"""The propcore benchmark: migrate_data against the physical limit, pgloader and dumpdata."""
