"""The live run: the worker loop, shard consumers, the fan-out to sinks, lease coordination,
the read budget, AWS health tracking and the multi-process supervisor."""
