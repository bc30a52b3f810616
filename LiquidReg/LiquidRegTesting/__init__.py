"""Checks of the Slicer integration shared by CI and the module's self-test in Slicer; installed
with the Slicer module, not in the wheel."""
