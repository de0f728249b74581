"""Foundation shared by every layer: errors, devices and memory, atomic files, closed sets (enums), optional dependencies. Imports nothing else of the library."""
