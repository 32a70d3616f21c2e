"""Stage engines: the loops and logic behind the stage scripts."""
