#!/bin/sh
# One-shot MinIO setup, shared by compose.yaml (minio-setup) and the dev-minio
# Kubernetes Job: the bucket, and a user holding the services' S3 key pair with a
# policy limited to that bucket, so the services never hold the root credentials.
# Idempotent: every run converges on the same state.
#
# Environment: MINIO_URL, MINIO_ROOT_USER, MINIO_ROOT_PASSWORD, PRUNELAB_BUCKET,
# PRUNELAB_S3_ACCESS_KEY, PRUNELAB_S3_SECRET_KEY.
set -eu

for name in MINIO_ROOT_PASSWORD PRUNELAB_S3_SECRET_KEY; do
  eval "value=\${$name}"
  case "$value" in
    *CHANGE-ME*) echo "minio-setup: $name still holds the placeholder from the example; set your own" >&2; exit 1 ;;
  esac
done

# mc keeps its aliases under $HOME/.mc; /tmp is writable even on a read-only root.
export HOME=/tmp

attempt=0
until mc alias set store "$MINIO_URL" "$MINIO_ROOT_USER" "$MINIO_ROOT_PASSWORD" >/dev/null 2>&1; do
  attempt=$((attempt + 1))
  if [ "$attempt" -ge 60 ]; then
    echo "minio-setup: MinIO at $MINIO_URL did not accept the root credentials within 120 s" >&2
    exit 1
  fi
  sleep 2
done

mc mb --ignore-existing "store/$PRUNELAB_BUCKET"

# printf, not a heredoc into cat: the mc image is minimal, keep to shell builtins.
printf '%s\n' "{
  \"Version\": \"2012-10-17\",
  \"Statement\": [
    {
      \"Effect\": \"Allow\",
      \"Action\": [\"s3:GetBucketLocation\", \"s3:ListBucket\", \"s3:ListBucketMultipartUploads\"],
      \"Resource\": [\"arn:aws:s3:::$PRUNELAB_BUCKET\"]
    },
    {
      \"Effect\": \"Allow\",
      \"Action\": [\"s3:GetObject\", \"s3:PutObject\", \"s3:DeleteObject\", \"s3:AbortMultipartUpload\", \"s3:ListMultipartUploadParts\"],
      \"Resource\": [\"arn:aws:s3:::$PRUNELAB_BUCKET/*\"]
    }
  ]
}" > /tmp/prunelab-policy.json
mc admin policy create store prunelab-services /tmp/prunelab-policy.json
# `user add` on an existing user resets its secret, so a changed key takes effect.
mc admin user add store "$PRUNELAB_S3_ACCESS_KEY" "$PRUNELAB_S3_SECRET_KEY"
# Attaching an already attached policy is an error; the end state is what matters.
if ! mc admin policy attach store prunelab-services --user "$PRUNELAB_S3_ACCESS_KEY" 2>/dev/null; then
  case "$(mc admin user info store "$PRUNELAB_S3_ACCESS_KEY")" in
    *prunelab-services*) ;;
    *) echo "minio-setup: could not attach policy prunelab-services to $PRUNELAB_S3_ACCESS_KEY" >&2; exit 1 ;;
  esac
fi
echo "minio-setup: bucket $PRUNELAB_BUCKET ready for $PRUNELAB_S3_ACCESS_KEY"
