"""Reading and writing volumes, points and tables in open formats."""
