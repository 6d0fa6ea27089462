"""Serving: adapters in RAM and device slots, whole-model switches, exact merges.

``state`` (lowest: the device-resident serving state the layers read), ``exact_merge`` (merges
that unmerge bit for bit), ``cache`` (``AdapterCache``: host LRU tier and device slots),
``switch`` (``switch_adapter`` / ``release_adapters``). Importing this package imports nothing
else: the layers import ``exact_merge`` and ``state`` from below the models, and ``cache`` and
``switch`` sit above them.
"""
