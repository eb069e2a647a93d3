#!/bin/sh
# One-shot MinIO setup, shared by compose.yaml (minio-setup) and the dev-minio
# Kubernetes Job: the bucket, and three users, so no service holds the root
# credentials and the evaluator and profiler hold less than the rest:
# - PRUNELAB_S3_ACCESS_KEY (pruner, tuner, orchestrator): read and write the bucket;
# - PRUNELAB_S3_EVALUATOR_ACCESS_KEY: read the bucket, write only below
#   results/evaluator/ (its PRUNELAB_STORE_WRITE_AREA, src/prunelab/store/base.py);
# - PRUNELAB_S3_PROFILER_ACCESS_KEY: read the bucket.
# Idempotent: every run converges on the same state.
#
# Environment: MINIO_URL, MINIO_ROOT_USER, MINIO_ROOT_PASSWORD, PRUNELAB_BUCKET, and the
# three key pairs: PRUNELAB_S3_{,EVALUATOR_,PROFILER_}{ACCESS,SECRET}_KEY.
set -eu

for name in MINIO_ROOT_PASSWORD PRUNELAB_S3_SECRET_KEY PRUNELAB_S3_EVALUATOR_SECRET_KEY PRUNELAB_S3_PROFILER_SECRET_KEY; do
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

bucket="arn:aws:s3:::$PRUNELAB_BUCKET"
list="{\"Effect\": \"Allow\", \"Action\": [\"s3:GetBucketLocation\", \"s3:ListBucket\", \"s3:ListBucketMultipartUploads\"], \"Resource\": [\"$bucket\"]}"
read="{\"Effect\": \"Allow\", \"Action\": [\"s3:GetObject\"], \"Resource\": [\"$bucket/*\"]}"
write_actions="\"s3:PutObject\", \"s3:AbortMultipartUpload\", \"s3:ListMultipartUploadParts\""

# policy NAME STATEMENT...: create (or update) a policy of these statements.
# printf, not a heredoc into cat: the mc image is minimal, keep to shell builtins.
policy() {
  name=$1
  shift
  statements=$(printf '%s,' "$@")
  printf '%s\n' "{\"Version\": \"2012-10-17\", \"Statement\": [${statements%,}]}" > "/tmp/$name.json"
  mc admin policy create store "$name" "/tmp/$name.json"
}

# user ACCESS_KEY SECRET_KEY POLICY: the user, with that policy attached.
user() {
  # `user add` on an existing user resets its secret, so a changed key takes effect.
  mc admin user add store "$1" "$2"
  # Attaching an already attached policy is an error; the end state is what matters.
  if ! mc admin policy attach store "$3" --user "$1" 2>/dev/null; then
    case "$(mc admin user info store "$1")" in
      *"$3"*) ;;
      *) echo "minio-setup: could not attach policy $3 to $1" >&2; exit 1 ;;
    esac
  fi
}

policy prunelab-services "$list" "{\"Effect\": \"Allow\", \"Action\": [\"s3:GetObject\", \"s3:DeleteObject\", $write_actions], \"Resource\": [\"$bucket/*\"]}"
policy prunelab-evaluator "$list" "$read" "{\"Effect\": \"Allow\", \"Action\": [$write_actions], \"Resource\": [\"$bucket/results/evaluator/*\"]}"
policy prunelab-readers "$list" "$read"
user "$PRUNELAB_S3_ACCESS_KEY" "$PRUNELAB_S3_SECRET_KEY" prunelab-services
user "$PRUNELAB_S3_EVALUATOR_ACCESS_KEY" "$PRUNELAB_S3_EVALUATOR_SECRET_KEY" prunelab-evaluator
user "$PRUNELAB_S3_PROFILER_ACCESS_KEY" "$PRUNELAB_S3_PROFILER_SECRET_KEY" prunelab-readers
echo "minio-setup: bucket $PRUNELAB_BUCKET ready for $PRUNELAB_S3_ACCESS_KEY, $PRUNELAB_S3_EVALUATOR_ACCESS_KEY (writes results/evaluator/ only) and $PRUNELAB_S3_PROFILER_ACCESS_KEY (reads only)"
