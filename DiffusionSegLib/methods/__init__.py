"""The segmentation methods behind one interface (``registry``): each method folder holds its network, its training objective and how it draws N masks. Nothing here reads images or writes outputs."""
