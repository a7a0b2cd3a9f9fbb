"""Shaping the flow per sink before it reaches the sink: route by table, filter with AWS event
filter patterns over the Lambda-shaped view of a change, transform (built-ins and plugins of the
entry-point group ``ddb_cdc.transforms``). :class:`pipeline.shaping.sink.ShapedSink` applies it;
:func:`pipeline.shaping.build.shaping_for` builds it from a sink's configuration."""
