"""The 3D Slicer side: the background job, the workflow, the MRML scene bridge and the module's widget. Imports Slicer's Qt only in the widget."""
