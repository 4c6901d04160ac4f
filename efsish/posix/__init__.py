"""POSIX planners: the pure functions that turn one POSIX call into log ops.

Each planner factory checks its arguments (raising FsError before anything is
submitted) and returns a planner, `(View, PlanContext) -> (ops, result)`, that
validates the request against the view in the committer's transaction. `rules` holds
the limits and checks they share; `namespace` the names (create, link, remove,
rename), `attrs` a file's attributes and layout, `xattrs` extended attributes and ACLs.

These modules sit between efsish.filesystem (which submits their planners, meters the
calls and keeps the open files) and efsish.meta. They must not import anything above
them (filesystem, access, fuse_ops, mount) nor pyfuse3, do I/O, touch trio or read
the clock (a planner's time is `pc.now_ns`).
"""
