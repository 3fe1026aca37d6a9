"""Folder of the `code_pass_at_k` evaluate metric (a package only so that installs ship it)."""
