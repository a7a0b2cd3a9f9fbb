"""DynamoDB Streams: the stream source (discovery, GetRecords) and the KCL-style lease table."""

from connectors.dynamodb_streams.lease_table import DynamoDBLeaseStore
from connectors.dynamodb_streams.source import DynamoDBStreamSource

__all__ = ["DynamoDBLeaseStore", "DynamoDBStreamSource"]
