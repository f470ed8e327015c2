"""Wire types shared by two or more roles."""
