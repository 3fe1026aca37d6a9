"""Folder of the `math_accuracy` evaluate metric (a package only so that installs ship it)."""
