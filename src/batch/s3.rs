//! The batch job's services on AWS: S3 through `aws-sdk-s3`, the chunk queue through `aws-sdk-sqs`.

use super::store::{BoxFuture, ChunkQueue, Object, ObjectStore, StoreError};
use aws_sdk_s3::error::{DisplayErrorContext, SdkError};
use aws_sdk_s3::primitives::ByteStream;

/// Objects in S3.
pub struct S3Store {
    client: aws_sdk_s3::Client,
}

impl S3Store {
    /// A store over `sdk`; `path_style` for endpoints that do not serve virtual-hosted buckets (a local moto).
    pub fn new(sdk: &aws_config::SdkConfig, path_style: bool) -> Self {
        let conf = aws_sdk_s3::config::Builder::from(sdk)
            .force_path_style(path_style)
            .build();
        Self {
            client: aws_sdk_s3::Client::from_conf(conf),
        }
    }
}

fn store_error<E: std::error::Error + 'static, R: std::fmt::Debug>(e: SdkError<E, R>) -> StoreError {
    StoreError(DisplayErrorContext(e).to_string())
}

impl ObjectStore for S3Store {
    fn get<'a>(&'a self, bucket: &'a str, key: &'a str) -> BoxFuture<'a, Result<Option<Object>, StoreError>> {
        Box::pin(async move {
            match self.client.get_object().bucket(bucket).key(key).send().await {
                Ok(out) => {
                    let etag = out.e_tag().unwrap_or_default().trim_matches('"').to_owned();
                    let bytes = out
                        .body
                        .collect()
                        .await
                        .map_err(|e| StoreError(e.to_string()))?
                        .into_bytes();
                    Ok(Some(Object {
                        bytes: bytes.to_vec(),
                        etag,
                    }))
                }
                Err(SdkError::ServiceError(e)) if e.err().is_no_such_key() => Ok(None),
                Err(e) => Err(store_error(e)),
            }
        })
    }

    fn put<'a>(&'a self, bucket: &'a str, key: &'a str, bytes: Vec<u8>) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            self.client
                .put_object()
                .bucket(bucket)
                .key(key)
                .body(ByteStream::from(bytes))
                .send()
                .await
                .map_err(store_error)?;
            Ok(())
        })
    }

    fn create<'a>(&'a self, bucket: &'a str, key: &'a str, bytes: Vec<u8>) -> BoxFuture<'a, Result<bool, StoreError>> {
        Box::pin(async move {
            let put = self
                .client
                .put_object()
                .bucket(bucket)
                .key(key)
                .if_none_match("*")
                .body(ByteStream::from(bytes));
            match put.send().await {
                Ok(_) => Ok(true),
                // 412 Precondition Failed: it exists; 409: a concurrent conditional write won.
                Err(SdkError::ServiceError(e)) if matches!(e.raw().status().as_u16(), 412 | 409) => Ok(false),
                Err(e) => Err(store_error(e)),
            }
        })
    }

    fn list<'a>(&'a self, bucket: &'a str, prefix: &'a str) -> BoxFuture<'a, Result<Vec<String>, StoreError>> {
        Box::pin(async move {
            let mut keys = Vec::new();
            let mut pages = self
                .client
                .list_objects_v2()
                .bucket(bucket)
                .prefix(prefix)
                .into_paginator()
                .send();
            while let Some(page) = pages.next().await {
                let page = page.map_err(store_error)?;
                keys.extend(page.contents().iter().filter_map(|o| o.key().map(str::to_owned)));
            }
            Ok(keys)
        })
    }
}

/// Chunk messages on an SQS queue.
pub struct SqsQueue {
    client: aws_sdk_sqs::Client,
    url: String,
}

impl SqsQueue {
    /// The queue at `url`.
    pub fn new(sdk: &aws_config::SdkConfig, url: impl Into<String>) -> Self {
        Self {
            client: aws_sdk_sqs::Client::new(sdk),
            url: url.into(),
        }
    }
}

impl ChunkQueue for SqsQueue {
    fn send<'a>(&'a self, body: String) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            self.client
                .send_message()
                .queue_url(&self.url)
                .message_body(body)
                .send()
                .await
                .map_err(|e| StoreError(aws_sdk_sqs::error::DisplayErrorContext(e).to_string()))?;
            Ok(())
        })
    }
}
