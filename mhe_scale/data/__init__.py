"""Dataset readers, writers and samplers; import the module you need, e.g.

    from mhe_scale.data.xc_format import read_xc_format   # Extreme Classification Repository files

Kept free of imports so that one reader never pulls in another's dependencies (DALI, datasets).
Every reader raises an error that names the file and the line or record it choked on.
"""
