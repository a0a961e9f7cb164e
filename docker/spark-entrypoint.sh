#!/usr/bin/env bash
# Command of Spark-on-Kubernetes pods that run the deltavec image.
#
# Spark starts executor pods with the single argument "executor" (and, in cluster
# mode, the driver pod with "driver" plus spark-submit arguments), and leaves it
# to the image to turn that into a JVM. The deltavec image's ENTRYPOINT is the
# deltavec CLI, so conf/k8s/pod-template.yaml makes this script the pods' command;
# anything else is handed to deltavec unchanged.
set -euo pipefail

classpath="${SPARK_CONF_DIR:-${SPARK_HOME}/conf}:${SPARK_HOME}/jars/*"
classpath+="${SPARK_EXTRA_CLASSPATH:+:${SPARK_EXTRA_CLASSPATH}}"
classpath+="${SPARK_DIST_CLASSPATH:+:${SPARK_DIST_CLASSPATH}}"

case "${1:-}" in
    executor)
        # The driver passes the executor's JVM options as SPARK_JAVA_OPT_0, _1, ...
        java_opts=()
        i=0
        while name="SPARK_JAVA_OPT_${i}" && [[ -n "${!name+set}" ]]; do
            java_opts+=("${!name}")
            i=$((i + 1))
        done
        exec java "${java_opts[@]}" \
            "-Xms${SPARK_EXECUTOR_MEMORY}" "-Xmx${SPARK_EXECUTOR_MEMORY}" \
            -cp "${classpath}" \
            org.apache.spark.scheduler.cluster.k8s.KubernetesExecutorBackend \
            --driver-url "${SPARK_DRIVER_URL}" \
            --executor-id "${SPARK_EXECUTOR_ID}" \
            --cores "${SPARK_EXECUTOR_CORES}" \
            --app-id "${SPARK_APPLICATION_ID}" \
            --hostname "${SPARK_EXECUTOR_POD_IP}" \
            --resourceProfileId "${SPARK_RESOURCE_PROFILE_ID}" \
            --podName "${SPARK_EXECUTOR_POD_NAME}"
        ;;
    driver)
        shift
        exec "${SPARK_HOME}/bin/spark-submit" \
            --conf "spark.driver.bindAddress=${SPARK_DRIVER_BIND_ADDRESS}" \
            --deploy-mode client "$@"
        ;;
    *)
        exec deltavec "$@"
        ;;
esac
